"""The vLLM server wrapper and the async client against a real vLLM (CPU) serving a tiny random Qwen3:
a server owned by a Ray actor, structured (JSON-schema) answers in request order, and the failure
kinds a stage sees (server down, timeout, HTTP 4xx) without exceptions."""
from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

import pytest

from conftest import QWEN_SERVER_ARGS, QWEN_SERVER_ENV, VLLM_PYTHON
from pipeline.config import LLMEndpointConfig, LLMServerConfig
from pipeline.llm.client import ChatRequest, LLMClient
from pipeline.llm.server import ServerStartError, VllmServer, free_port, port_open, resolve_python

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def fusion_like_schema(i: int) -> dict:
    """Shaped like prompt fusion's answer; `id` can only be `i`, so request order is visible."""
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "enum": [i]},
            "genre": {"type": "string", "enum": ["rock", "jazz", "ambient", "orchestral", "electronic"]},
            "bpm": {"type": "integer", "minimum": 40, "maximum": 220},
            # ASCII-only strings: random weights also emit lone bytes of multi-byte characters, which
            # decode to U+FFFD and can push a decoded string past maxLength.
            "mood": {"type": "string", "pattern": "^[a-z ]{0,24}$"},
            "instruments": {"type": "array", "maxItems": 3,
                            "items": {"type": "string", "pattern": "^[a-z ]{0,16}$"}},
            "vocals": {"type": "boolean"},
        },
        "required": ["id", "genre", "bpm", "mood", "instruments", "vocals"],
        "additionalProperties": False,
    }


def _messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": f"Clip {i}: tempo {80 + i} bpm, key A minor, piano and strings, calm."}]


# -- no server needed ------------------------------------------------------------------------------
def test_server_settings_from_section(tmp_path):
    section = LLMEndpointConfig(model="Qwen/Qwen3-8B", serve=True, server=LLMServerConfig(
        python=str(VLLM_PYTHON), args=["--served-model-name", "fusion", "--max-model-len", "4096"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout_s=30))
    s = VllmServer.from_section(section, port=free_port(), log_path=tmp_path / "s.log")
    assert s.served_model_name == "fusion" and s.startup_timeout_s == 30
    cmd = s.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "Qwen/Qwen3-8B" and "--max-model-len" in cmd
    assert s.base_url == f"http://127.0.0.1:{s.port}/v1"
    assert not s.alive()
    s.stop()  # idempotent before a start


def test_missing_interpreter_is_explained():
    with pytest.raises(FileNotFoundError, match="make vllm-env"):
        resolve_python("/nonexistent/venv/bin/python")


def test_server_down_every_result_unavailable():
    port = free_port()  # nothing listens there
    client = LLMClient(f"http://127.0.0.1:{port}/v1", "tiny-qwen3", timeout_s=5, retries=1)
    t0 = time.perf_counter()
    results = client.chat_many([ChatRequest(_messages(i), max_tokens=8) for i in range(5)])
    client.close()
    assert len(results) == 5
    assert all(not r.ok and r.error_kind == "unavailable" for r in results), [r.error for r in results]
    assert time.perf_counter() - t0 < 30


# -- against real vLLM servers ---------------------------------------------------------------------
@pytest.mark.slow
def test_start_failure_carries_the_server_log(tmp_path, tiny_qwen_dir):
    server = VllmServer(str(tiny_qwen_dir), python=str(VLLM_PYTHON), args=["--no-such-flag"], env=QWEN_SERVER_ENV,
                        startup_timeout_s=120, log_path=tmp_path / "bad.log").start()
    with pytest.raises(ServerStartError, match="no-such-flag"):
        server.wait_ready()
    assert not server.alive()


@pytest.mark.slow
def test_server_actor_serves_and_stops(ray_local, tiny_qwen_dir, tmp_path):
    import ray

    from pipeline.llm.server import start_server_actor, stop_server_actor

    # num_cpus=0: the actor only waits on its process; the 2 test CPUs stay free for other stages.
    section = LLMEndpointConfig(model=str(tiny_qwen_dir), serve=True, server=LLMServerConfig(
        python=str(VLLM_PYTHON), num_gpus=0, num_cpus=0, args=QWEN_SERVER_ARGS + ["--served-model-name", "tiny-qwen3"],
        env=QWEN_SERVER_ENV, startup_timeout_s=240))
    handle, base_url = start_server_actor("test-llm-server", section, log_dir=tmp_path)
    try:
        url = urlparse(base_url)
        assert url.hostname == ray.util.get_node_ip_address() and url.path == "/v1"
        client = LLMClient(base_url, "tiny-qwen3", timeout_s=60, retries=0)
        assert client.models() == ["tiny-qwen3"]
        [result] = client.chat_many([ChatRequest(_messages(0), max_tokens=16, extra_body=NO_THINK)])
        client.close()
        assert result.ok, result.error
        assert result.completion_tokens > 0 and result.prompt_tokens > 0
        assert ray.get(handle.alive.remote())
        pid = ray.get(handle.pid.remote())
    finally:
        stop_server_actor(handle)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not port_open(url.hostname, url.port)
    assert (tmp_path / "test-llm-server.log").stat().st_size > 0


@pytest.mark.slow
def test_structured_answers_validate_and_keep_order(qwen_server):
    import jsonschema

    n = 12
    client = LLMClient(qwen_server["base_url"], qwen_server["model"], max_concurrency=8, timeout_s=120, retries=1)
    requests = [ChatRequest(_messages(i), max_tokens=256, json_schema=fusion_like_schema(i), extra_body=NO_THINK)
                for i in range(n)]
    results = client.chat_many(requests)
    client.close()
    assert len(results) == n
    for i, r in enumerate(results):
        assert r.ok, r.error
        assert r.finish_reason == "stop", (r.finish_reason, r.text)
        # strict=False: xgrammar lets raw control characters (\x08...) into JSON strings, which
        # RFC 8259 forbids and json.loads rejects by default; random weights do emit them.
        answer = json.loads(r.text, strict=False)
        jsonschema.validate(answer, fusion_like_schema(i))
        assert answer["id"] == i  # the i-th result answers the i-th request
        assert r.completion_tokens > 0 and r.latency_s > 0


@pytest.mark.slow
def test_timeout_is_reported_not_raised(qwen_server):
    client = LLMClient(qwen_server["base_url"], qwen_server["model"], timeout_s=0.05, retries=0)
    body = {**NO_THINK, "ignore_eos": True}  # vLLM's extension: generate all max_tokens
    results = client.chat_many([ChatRequest(_messages(i), max_tokens=1500, extra_body=body) for i in range(2)])
    client.close()
    assert [r.error_kind for r in results] == ["timeout", "timeout"], [r.error for r in results]


@pytest.mark.slow
def test_http_4xx_is_not_retried(qwen_server):
    client = LLMClient(qwen_server["base_url"], "no-such-model", timeout_s=30, retries=3)
    t0 = time.perf_counter()
    results = client.chat_many([ChatRequest(_messages(i), max_tokens=8) for i in range(3)])
    client.close()
    assert all(r.error_kind in ("http_404", "http_400") for r in results), [r.error for r in results]
    # 3 retries with the SDK's backoff would take seconds; a 4xx answer comes back at once.
    assert time.perf_counter() - t0 < 5
    assert all(r.latency_s < 2 for r in results)
