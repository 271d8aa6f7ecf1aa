"""The model stages inside the whole pipeline on Ray, with tiny random CLIP and VAE models loaded
through the same code as real weights: what lands in the shards and the index, and the decode."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import webdataset as wds

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(feature_shards):
    out, record = feature_shards
    samples = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            samples[sample["__key__"]] = sample
    return out, record, samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_shards_carry_clip_latents_and_tags(built):
    out, record, samples = built
    assert set(record["skipped_stages"]) == {"music_captions"}  # no MusicFlamingo endpoint here
    assert {"clip_embed", "vae_latents"} <= set(record["stages"])
    assert record["counts"]["clips_reconcile"] and len(samples) == record["counts"]["clips_written"] > 3
    frames = int(10 * 4)  # clip_seconds x frame_fps
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["has_clip"] and meta["has_latent"], key
        emb = npy(sample["clip.npy"])
        assert emb.dtype == np.float16 and emb.shape == (frames, meta["clip_embed"]["dim"])
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
        latent, std = npy(sample["latent.npy"]), npy(sample["latent_std.npy"])
        assert latent.dtype == std.dtype == np.float16
        assert latent.shape == std.shape == (meta["latent"]["channels"], 250)  # 10 s at 25 Hz
        assert np.isfinite(latent).all() and (std > 0).all()
        assert meta["latent"]["latent_hz"] == 25
        tags = meta["visual_tags"]
        assert {"setting", "subject", "mood", "motion", "time_of_day"} <= set(tags)
        assert all(0 <= t["score"] <= 1 for cat in tags.values() for t in cat)


def test_index_says_what_each_sample_has(built):
    out, _, samples = built
    index = pads.dataset(str(out / "index")).to_table().to_pylist()
    assert sorted(r["key"] for r in index) == sorted(samples)
    for row in index:
        meta = json.loads(samples[row["key"]]["json"])
        assert row["has_clip"] and row["has_latent"] and row["latent_frames"] == 250
        assert {"clip.npy", "latent.npy", "latent_std.npy"} <= set(row["members"])
        best = [f"{cat}:{tags[0]['tag']}" for cat, tags in meta["visual_tags"].items()]
        assert row["visual_tags"] == best
        assert row["visual_tag_scores"] == pytest.approx([tags[0]["score"] for tags in meta["visual_tags"].values()], abs=1e-6)


def test_a_latent_decodes_to_the_clip_duration_and_channels(built, tiny_feature_models):
    from model.vae import AudioVAE

    _, _, samples = built
    vae = AudioVAE.load(tiny_feature_models["vae_latents.config_file"], tiny_feature_models["vae_latents.checkpoint"], "tiny")
    latent = npy(next(iter(samples.values()))["latent.npy"]).astype(np.float32)
    audio = vae.decode(latent[None])
    assert audio.shape == (1, 2, 480000)  # 10 s of 48 kHz stereo, like the clip's flac
    assert np.isfinite(audio).all()


def test_missing_weights_fail_before_anything_is_written(tmp_path, media_dir):
    """on_missing=fail (the default and the cluster preset): exit 3, the message names the file to
    fetch, and the output folder is not even created."""
    out = tmp_path / "never"
    run = subprocess.run(
        [sys.executable, str(ROOT / "pipeline/build.py"), "--input", str(media_dir), "--output", str(out),
         "runner.engine=loop", "vae_latents.on_missing=skip"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 3, run.stderr[-2000:]
    assert "stage clip_embed cannot run" in run.stderr and "clip_embed.on_missing=skip" in run.stderr
    assert "hf download" in run.stderr
    assert not out.exists()
