"""Weight resolution (local path -> Hugging Face cache -> download) and the driver-side preflight
that fails a run, or skips a stage, before anything is written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.preflight import prepare_stages
from pipeline.weights import WeightsMissing, resolve, resolve_hub_file

ROOT = Path(__file__).resolve().parent.parent


def fake_hub_cache(root: Path, repo: str, filename: str, payload: bytes) -> Path:
    """The on-disk layout huggingface_hub keeps: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    return path


def test_local_path_wins_and_a_missing_one_is_named(tmp_path):
    f = tmp_path / "w.ckpt"
    f.write_bytes(b"x")
    assert resolve(str(f), "org/repo", "w.ckpt", "vae", "vae_latents.checkpoint") == str(f.resolve())
    with pytest.raises(WeightsMissing, match=r"vae: .*nope\.ckpt is not a file"):
        resolve(str(tmp_path / "nope.ckpt"), "org/repo", "w.ckpt", "vae", "vae_latents.checkpoint")


def test_hub_cache_is_used_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    cached = fake_hub_cache(tmp_path, "org/model", "weights.bin", b"cached")
    got = resolve_hub_file("org/model", "weights.bin", "clip", "clip_embed.pretrained")
    assert Path(got).read_bytes() == b"cached" and Path(got).resolve() == cached.resolve()


def test_offline_and_unreachable_say_what_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsMissing) as offline:
        resolve_hub_file("org/model", "weights.bin", "clip", "clip_embed.pretrained")
    assert "HF_HUB_OFFLINE" in str(offline.value)
    assert "hf download org/model weights.bin" in str(offline.value)
    assert "clip_embed.pretrained=" in str(offline.value)
    # Online mode against a port nobody listens on: fails in one connect, not after retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(WeightsMissing, match="cannot be reached"):
        resolve_hub_file("org/model", "weights.bin", "clip", "clip_embed.pretrained")
