"""Helpers shared by the test modules (import as `from helpers import ...`)."""
from __future__ import annotations

import json
from pathlib import Path


def load_truth(video: Path) -> dict:
    return json.loads(video.with_suffix(".truth.json").read_text())


def small_config(**overrides):
    """The test preset: no progress bars, small shards, a 2-CPU local Ray, and the model stages
    skipped for want of weights (tests that need them pass tiny models; see test_features_e2e)."""
    from pipeline.config import load_config

    items = {
        "runner.progress_bars": "false", "runner.num_cpus": "2", "writer.samples_per_shard": "4",
        "clip_embed.on_missing": "skip", "vae_latents.on_missing": "skip", **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in items.items()])
