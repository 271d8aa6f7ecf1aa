"""The whole pipeline with prompt fusion through a real vLLM server (the tiny CPU Qwen3), and with
the server gone: fused attributes and prompts land in shards and index with provenance, and no
clip is ever lost to the LLM."""
from __future__ import annotations

import json
import socket

import pyarrow.dataset as pads
import pytest
import webdataset as wds

from pipeline.build import build
from prompts.fusion_schema import FusionAnswer

from helpers import small_config

pytestmark = pytest.mark.slow


def samples(out) -> dict[str, dict]:
    found = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            found[s["__key__"]] = json.loads(s["json"])
    return found


def test_fused_prompts_through_the_real_server(ray_local, media_dir, qwen_server, tmp_path):
    out = tmp_path / "out"
    record = build(str(media_dir), str(out), small_config(**{
        "llm.endpoint": qwen_server["base_url"], "llm.model": qwen_server["model"], "llm.max_tokens": 1024}), quiet=True)
    c = record["counts"]
    assert c["clips_reconcile"] and c["clips_written"] == c["clips"] > 3  # none lost
    metas = samples(out)
    index = {r["key"]: r for r in pads.dataset(str(out / "index")).to_table().to_pylist()}
    assert sorted(index) == sorted(metas)
    llm = [k for k, m in metas.items() if m["prompt_source"]["composer"] == "llm"]
    assert llm, "the tiny server's structured answers should give the LLM composer some clips"
    counters = record["counters"]
    assert counters.get("prompt_fusion.composer.llm", 0) == len(llm)
    assert counters.get("prompt_fusion.composer.template", 0) == len(metas) - len(llm)
    for key, meta in metas.items():
        row = index[key]
        assert meta["prompts"] and row["prompts"] and row["prompt_source"] == meta["prompt_source"]["composer"]
        if key in llm:
            fused = meta["fused"]
            prov = fused["provenance"]
            assert prov["model"] == qwen_server["model"] and prov["template"] == "fusion.v1" and prov["schema_version"]
            # The stored attributes are schema-valid, and the measurement won on tempo and key.
            FusionAnswer.model_validate({"attributes": {k: v for k, v in fused["attributes"].items() if k != "key"},
                                         "caption_claims": fused["caption_claims"], "prompts": meta["prompts"]})
            assert fused["attributes"]["tempo_bpm"] == pytest.approx(meta["music"]["tempo_bpm"], rel=1e-6)
            assert row["genres"] == fused["attributes"]["genres"] and row["moods"] == fused["attributes"]["moods"]
            assert row["vocals_present"] == fused["attributes"]["vocals_present"]
            assert {p["level"] for p in row["prompts"]} == {"full_spec", "musical", "scene", "intent"}
        else:  # flagged, with a reason
            assert meta["flags"]["llm_fallback"] == row["prompt_fallback_reason"] != "no_endpoint"


def test_server_down_every_clip_flagged_none_lost(ray_local, media_dir, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "down"
    record = build(str(media_dir), str(out), small_config(**{
        "llm.endpoint": f"http://127.0.0.1:{port}/v1", "llm.model": "tiny-qwen3", "llm.retries": 1}), quiet=True)
    c = record["counts"]
    assert c["clips_reconcile"] and c["clips_written"] == c["clips"] > 3 and c["clips_rejected"] == 0
    index = pads.dataset(str(out / "index")).to_table(columns=["prompt_source", "prompt_fallback_reason"]).to_pylist()
    assert {(r["prompt_source"], r["prompt_fallback_reason"]) for r in index} == {("template", "unavailable")}
    assert record["counters"]["prompt_fusion.fallback.unavailable"] == c["clips_written"]


def test_the_pipeline_starts_and_stops_its_own_server(ray_local, media_dir, qwen_server, tmp_path):
    """llm.serve=true (the cluster preset's way): a Ray actor owns a vLLM process for the run, the
    stage is pointed at it, and it is gone when the run ends."""
    from conftest import QWEN_SERVER_ARGS, QWEN_SERVER_ENV, VLLM_PYTHON

    config = small_config(**{"llm.serve": "true", "llm.model": qwen_server["model_dir"],
                             "llm.server.num_gpus": "0", "llm.server.num_cpus": "0", "llm.max_tokens": 1024})
    config.llm.server.python = str(VLLM_PYTHON)
    config.llm.server.args = list(QWEN_SERVER_ARGS)
    config.llm.server.env = dict(QWEN_SERVER_ENV)
    out = tmp_path / "served"
    record = build(str(media_dir / "video_0.mp4"), str(out), config, quiet=True)
    url = record["llm_servers"]["llm"]
    assert url.startswith("http://") and record["config"]["llm"]["endpoint"] == url
    counters = record["counters"]
    assert counters.get("prompt_fusion.fallback.no_endpoint", 0) == 0
    assert counters.get("prompt_fusion.composer.llm", 0) + counters.get("prompt_fusion.composer.template", 0) == record["counts"]["clips_written"] > 0
    assert counters.get("prompt_fusion.fallback.unavailable", 0) == 0  # the server was up for the whole run
    host, port = url.split("//")[1].split("/")[0].split(":")
    with pytest.raises(OSError):  # ...and is gone now
        socket.create_connection((host, int(port)), timeout=2).close()
