"""visual_rhythm: 25 Hz resampling, cut impulses, and the transition-beat alignment score."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.registry import drops_after
from stages.visual_rhythm import VisualRhythm, cut_beat_alignment, impulses, resample_max

from helpers import small_config


def test_alignment_counts_cuts_within_tolerance():
    beats = [0.0, 0.5, 1.0, 1.5, 2.0]
    assert cut_beat_alignment([0.52, 1.2, 1.99], beats, tolerance=0.05) == pytest.approx(2 / 3)
    assert cut_beat_alignment([0.75], beats, tolerance=0.5) == 1.0
    assert cut_beat_alignment([], beats, tolerance=0.5) is None
    assert cut_beat_alignment([1.0], [], tolerance=0.5) == 0.0


def test_impulses_land_on_the_nearest_frame():
    track = impulses([0.0, 1.02, 9.99, 12.0], seconds=10.0, rate=25)
    assert track.shape == (250,) and list(np.flatnonzero(track)) == [0, 26]  # 9.99 rounds to 250: outside


def test_resample_keeps_peaks_of_fast_video_and_fills_slow_video():
    t60 = np.arange(600) / 60.0
    v60 = np.zeros(600)
    v60[121] = 1.0  # one spike between two 25 Hz frame centres
    out = resample_max(t60, v60, seconds=10.0, rate=25)
    assert out.shape == (250,) and out.max() == 1.0 and int(np.argmax(out)) == int(121 / 60 * 25)
    t10 = np.arange(100) / 10.0
    slow = resample_max(t10, t10, seconds=10.0, rate=25)
    assert np.all(np.diff(slow) >= -1e-6) and slow[-1] > 9.8  # a ramp stays a ramp, no holes


def test_stage_packs_rhythm_and_scores_alignment():
    cfg = small_config()
    beats = [i * 0.5 for i in range(20)]
    row = {
        "key": "k",
        "meta": {"clip": {"index": 0, "is_last": True, "cut_times": [2.0, 4.3]}, "music": {"beat_times": beats}},
        "onset_25hz": np.ones(250, np.float32),
        "beat_25hz": impulses(beats, 10.0, 25),
        "motion_25hz": np.full(250, 0.02, np.float32),
    }
    (out,) = list(VisualRhythm(cfg).run([row], drops_after(cfg.stages)["visual_rhythm"]))
    assert out["rhythm"].shape == (4, 250) and out["rhythm"].dtype == np.float16
    assert out["rhythm"][2].sum() == 2 and "onset_25hz" not in out and "motion_25hz" not in out
    assert out["meta"]["visual"]["cut_beat_alignment"] == 1.0  # 4.3 is within 0.5 s of 4.5
    strict = small_config(**{"visual_rhythm.beat_tolerance_seconds": 0.1, "visual_rhythm.min_alignment": 0.9})
    row.update(onset_25hz=np.ones(250, np.float32), beat_25hz=impulses(beats, 10.0, 25), motion_25hz=np.zeros(250, np.float32))
    (rejected,) = list(VisualRhythm(strict).run([row]))
    assert rejected.reason == "cuts_off_beat"
