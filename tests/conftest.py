"""Shared fixtures: a small Ray for the whole session, and media with known ground truth."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No test may reach the Hugging Face hub: weights resolve from local files or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
# Caches the stages keep (CLIP tag embeddings) go to a fresh folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="video-robin-test-cache-")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's spin
    waits make steps stall for seconds; one thread keeps the timings steady."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, namespace="video-robin")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """Three 24 s videos with known cuts, tempo, key and chords (and their .truth.json)."""
    from pipeline.synth.media import make_video

    folder = tmp_path_factory.mktemp("media")
    for i in range(3):
        make_video(folder / f"video_{i}.mp4", seconds=24.0, seed=10 + i)
    return folder


@pytest.fixture(scope="session")
def tiny_feature_models(tmp_path_factory) -> dict[str, str]:
    """Config overrides that load a tiny random CLIP and a tiny random VAE (8 latent channels, 25 Hz)
    through the same code as real weights."""
    from tiny_clip import make_tiny_clip
    from tiny_vae import make_tiny_vae

    folder = tmp_path_factory.mktemp("models")
    clip_name, clip_config, clip_ckpt = make_tiny_clip(folder)
    vae_config, vae_ckpt = make_tiny_vae(folder)
    return {
        "clip_embed.model": clip_name, "clip_embed.config_file": str(clip_config),
        "clip_embed.pretrained": str(clip_ckpt), "clip_embed.on_missing": "fail",
        "vae_latents.preset": "tiny", "vae_latents.config_file": str(vae_config),
        "vae_latents.checkpoint": str(vae_ckpt), "vae_latents.on_missing": "fail",
    }


@pytest.fixture(scope="session")
def feature_shards(ray_local, media_dir, tiny_feature_models, tmp_path_factory):
    """(OUT, run record) of one real pipeline run over `media_dir` with the tiny CLIP and VAE: shards
    with clip.npy, latent.npy, rhythm.npy, flac, jpg and template prompts (6 clips in 2 shards).
    Shared by the feature, browse and trainer tests; treat it as read-only (copy it to damage it)."""
    from pipeline.build import build

    from helpers import small_config

    out = tmp_path_factory.mktemp("features")
    record = build(str(media_dir), str(out), small_config(**tiny_feature_models), quiet=True)
    return out, record


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 folder (tests/tiny_qwen.py), built once per session with .venv-vllm."""
    from tiny_qwen import build_in_subprocess

    if not VLLM_PYTHON.exists():  # fail, not skip: `make test` (and so CI) builds it
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-env` (`make test` builds it)", pytrace=False)
    return build_in_subprocess(VLLM_PYTHON, tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="session")
def qwen_server(tiny_qwen_dir, tmp_path_factory):
    """A real vLLM OpenAI-compatible server (CPU) serving the tiny Qwen3 as `tiny-qwen3`, shared by the
    whole session (start-up takes ~60 s on 2 cores). Yields a dict: base_url (.../v1), model,
    model_dir, server (the VllmServer)."""
    from pipeline.llm.server import VllmServer

    server = VllmServer(str(tiny_qwen_dir), python=str(VLLM_PYTHON), served_model_name="tiny-qwen3",
                        args=QWEN_SERVER_ARGS, env=QWEN_SERVER_ENV, startup_timeout_s=240,
                        log_path=tmp_path_factory.mktemp("vllm-log") / "server.log")
    server.start()
    try:
        server.wait_ready()
    except Exception as exc:  # noqa: BLE001 - the message carries the server's log tail
        server.stop()
        pytest.fail(f"the tiny Qwen3 vLLM server did not start: {exc}", pytrace=False)
    yield {"base_url": server.base_url, "model": "tiny-qwen3", "model_dir": str(tiny_qwen_dir), "server": server}
    server.stop()


# How the tests run vLLM on CPU (shared/REFERENCE.md): 1 GiB KV cache, float32, a short context.
# No free whitespace inside structured (JSON) answers: random weights would otherwise spend the token
# budget on spaces and newlines before the JSON closes.
QWEN_SERVER_ARGS = ["--max-model-len", "4096", "--dtype", "float32", "--gpu-memory-utilization", "0.1",
                    "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
QWEN_SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "DO_NOT_TRACK": "1"}


# --- A real S3-compatible server (tests/s3_server.py) -------------------------------------------
# Its address goes into the environment now, at import, before `ray_local` (or anything else) starts
# worker processes: every process of the session, Ray workers and subprocess drivers included, then
# reaches s3:// at the test server and never at AWS. The server itself starts only when a test asks
# for `s3_server`; until then s3:// calls fail fast with "connection refused".
from s3_server import MotoServer, TcpProxy, apply_s3_env, free_port  # noqa: E402

S3_MOTO_PORT, S3_PROXY_PORT = free_port(), free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PROXY_PORT}"
apply_s3_env(S3_ENDPOINT)


class S3Server:
    def __init__(self, moto: MotoServer, proxy: TcpProxy):
        self.moto, self.proxy, self.endpoint = moto, proxy, S3_ENDPOINT


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server behind a TcpProxy on the ports the environment already names. `.proxy.pause()`
    / `.resume()` / `.outage(s)` take the endpoint down and up; `.endpoint` is its URL."""
    moto = MotoServer(S3_MOTO_PORT, log_path=tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        proxy = TcpProxy(moto.port, listen_port=S3_PROXY_PORT)
    except BaseException:
        moto.stop()
        raise
    yield S3Server(moto, proxy)
    proxy.close()
    moto.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: yields its URL, s3://<name>."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    if s3_server.proxy.paused:  # a previous test's outage must not leak into the next one
        s3_server.proxy.resume()
    boto3.client("s3").create_bucket(Bucket=name)
    yield f"s3://{name}"
