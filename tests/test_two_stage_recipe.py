"""The README's two-stage recipe end to end, on shards the real pipeline wrote (tiny random CLIP and
VAE): `debug` t2m for a few hundred steps, v2m from it, then model/generate.py scores one of the
source videos. Checks what a user would: the loss went down, the hand-off kept the t2m weights,
and the scored video has a soundtrack of the right length and sample rate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
T2M_STEPS, V2M_STEPS = 300, 100

pytestmark = pytest.mark.slow


def train(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "model/train.py"), "--preset", "debug", "--batch-size", "4", "--num-workers", "0",
           "--log-every", "50", "--lr", "2e-3", "--warmup", "20", "--no-tensorboard", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(feature_shards, tmp_path_factory):
    out, _ = feature_shards
    base = tmp_path_factory.mktemp("recipe")
    train("--stage", "t2m", "--shards", str(out), "--out", str(base / "t2m"), "--steps", str(T2M_STEPS))
    train("--stage", "v2m", "--shards", str(out), "--init", str(base / "t2m"), "--out", str(base / "v2m"),
          "--steps", str(V2M_STEPS))
    return base


def test_training_learns_and_hands_over(runs):
    t2m = losses(runs / "t2m")
    assert len(t2m) >= T2M_STEPS // 50
    first, last = sum(t2m[:2]) / 2, sum(t2m[-2:]) / 2
    # Logged losses are 50-step means; flow matching keeps an irreducible noise term, so a clear
    # fall is ~25 % here (1.88 -> 1.37 when this was written), not a collapse.
    assert last < 0.85 * first, t2m
    report = json.loads((runs / "v2m" / "init_report.json").read_text())
    assert report["loaded"] and all("video" in k for k in report["new"])


def test_scored_video_has_a_soundtrack_of_the_right_length(runs, media_dir, tiny_feature_models, tmp_path):
    from model.checkpoint import list_checkpoints

    ckpt = list_checkpoints(runs / "v2m")[-1]
    video = sorted(media_dir.glob("*.mp4"))[0]
    out = tmp_path / "scored.mp4"
    weights = [f"{k}={v}" for k, v in tiny_feature_models.items() if k.endswith(("config_file", "pretrained", "checkpoint"))]
    done = subprocess.run([sys.executable, str(ROOT / "model/generate.py"), "--ckpt", str(ckpt), "--video", str(video),
                           "--prompt", "calm piano with soft strings", "--seconds", "6", "--steps", "4",
                           "--out", str(out), *weights], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    audio, rate = sf.read(str(out.with_suffix(".wav")), always_2d=True)
    assert rate == 48000 and audio.shape == (6 * 48000, 2)
    assert (abs(audio) > 1e-4).any()  # not silence
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac" and a.rate == 48000
        assert float(a.duration * a.time_base) == pytest.approx(6.0, abs=0.1)
        assert c.streams.video[0].codec_context.name == "h264"
