"""Resume: a run killed mid-way (SIGKILL of the driver's whole process group) and restarted ends with
exactly the keys of an uninterrupted run: no duplicates, no partial shard under a final name."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import webdataset as wds

from pipeline.build import build
from pipeline.synth import make_video

from helpers import small_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def keys_in_tars(out: Path) -> list[str]:
    return [s["__key__"] for tar in sorted((out / "shards").glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)]


def test_killed_run_resumes_to_the_same_keys(tmp_path):
    videos = tmp_path / "videos"
    for i in range(6):
        make_video(videos / f"v{i}.mp4", seconds=24.0, seed=40 + i)
    reference = tmp_path / "reference"
    build(str(videos), str(reference), small_config(**{"runner.engine": "loop", "writer.samples_per_shard": 1}), quiet=True)
    expected = sorted(pads.dataset(str(reference / "index")).to_table(columns=["key"]).column("key").to_pylist())

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "pipeline/build.py"), "--input", str(videos), "--output", str(out),
           # One CPU: also proves the writer's actor pool cannot starve the 1-CPU stages.
           "runner.progress_bars=false", "runner.num_cpus=1", "writer.samples_per_shard=1",
           "clip_embed.on_missing=skip", "vae_latents.on_missing=skip"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "shards").glob("*.tar")):
        assert driver.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # Restart at once: Ray workers of the killed run may still be finishing a shard. They must not
    # commit it once the new run owns the folder (pipeline/ownership.py).
    finished = sorted(pads.dataset(str(out / "index")).to_table(columns=["key"]).column("key").to_pylist())
    assert 0 < len(finished) < len(expected), "the kill should land mid-run"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"counts reconcile\s+yes", rerun.stdout), rerun.stdout
    index_keys = pads.dataset(str(out / "index")).to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(index_keys) == expected  # the same keys, none twice
    assert sorted(keys_in_tars(out)) == expected  # and the tars agree: no orphan or duplicate samples
    assert not [p for p in (out / "shards").iterdir() if not p.name.endswith(".tar")]  # no temporaries left
    assert len(list((out / "runs").glob("*.json"))) == 1  # the killed run never wrote a record
