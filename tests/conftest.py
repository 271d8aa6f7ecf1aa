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
