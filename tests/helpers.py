"""Helpers shared by the test modules (import as `from helpers import ...`)."""
from __future__ import annotations

import json
from pathlib import Path


def load_truth(video: Path) -> dict:
    return json.loads(video.with_suffix(".truth.json").read_text())


def small_config(**overrides):
    """The test preset: no progress bars, small shards, a 2-CPU local Ray."""
    from pipeline.config import load_config

    items = {"runner.progress_bars": "false", "runner.num_cpus": "2", "writer.samples_per_shard": "4", **overrides}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])
