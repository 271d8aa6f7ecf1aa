"""segment + decode: cut times, clip windows, frames and audio against media with known truth."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.stage import Reject, RunContext
from pipeline.synth.media import make_video
from stages.probe import Probe
from stages.segment import Segment

from helpers import load_truth, small_config


def probe_row(cfg, path):
    row = next(Probe(cfg).process([{"key": "x", "meta": {"source": {"path": str(path), "input_index": 0}}}]))
    assert not isinstance(row, Reject), row
    return row


def clips_of(cfg, path, done=frozenset()):
    stage = Segment(cfg, RunContext("unused", "test", done_keys=frozenset(done)))
    return list(stage.process([probe_row(cfg, path)]))


def check_cuts(clips, truth, tolerance):
    """Every true cut strictly inside a clip is found within `tolerance`, and nothing else is."""
    for clip in clips:
        meta = clip["meta"]["clip"]
        start, end = meta["start"], meta["end"]
        expected = [c - start for c in truth["cut_times"] if start + tolerance < c < end - tolerance]
        found = meta["cut_times"]
        for c in expected:
            assert min((abs(f - c) for f in found), default=99) <= tolerance, (c, found)
        for f in found:
            assert min(abs(f - (c - start)) for c in truth["cut_times"]) <= tolerance, (f, expected)


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_cut_times_within_one_frame(tmp_path, fps):
    path = tmp_path / "v.mp4"
    truth = make_video(path, seconds=32.0, fps=fps, seed=3)
    cfg = small_config()
    clips = clips_of(cfg, path)
    assert len(clips) >= 2
    check_cuts(clips, truth, 1.0 / fps + 1e-6)
    assert sum(len(c["meta"]["clip"]["cut_times"]) for c in clips) >= 2  # the check above saw real cuts


def test_variable_frame_rate_cuts(tmp_path):
    path = tmp_path / "vfr.mp4"
    truth = make_video(path, seconds=24.0, vfr=True, seed=4)
    clips = clips_of(small_config(), path)
    gaps = np.diff(truth["frame_times"])
    check_cuts(clips, truth, float(gaps.max()) + 1e-6)


def test_windows_are_shot_aware_and_complete(tmp_path):
    path = tmp_path / "v.mp4"
    truth = make_video(path, seconds=40.0, shot_seconds=[3.0, 8.5, 6.0, 7.5, 5.0, 10.0], seed=5)
    cfg = small_config()
    clips = clips_of(cfg, path)
    frame = 1.0 / truth["fps"]
    metas = [c["meta"]["clip"] for c in clips]
    assert [m["index"] for m in metas] == list(range(len(metas)))
    assert [m["is_last"] for m in metas] == [False] * (len(metas) - 1) + [True]
    for prev, cur in zip(metas, metas[1:]):
        near = [c for c in truth["cut_times"] if prev["end"] - frame <= c <= prev["end"] + cfg.segment.snap_seconds]
        # The next clip starts on the first cut within snap_seconds of the previous end, else right at it.
        expected = near[0] if near else prev["end"]
        assert abs(cur["start"] - expected) <= frame + 1e-6, (prev, cur, near)
    assert metas[-1]["end"] <= truth["seconds"] + 1e-6
    for clip in clips:
        assert clip["frames"].shape == (40, 224, 224, 3) and clip["frames"].dtype == np.uint8
        assert clip["audio48"].shape == (2, 480000) and clip["audio16"].shape == (160000,)
        assert clip["motion_25hz"].shape == (250,)
        assert clip["key"] == f"{clip['meta']['source']['source_id']}_{int(round(clip['meta']['clip']['start'] * 1000)):08d}"


def test_audio_is_aligned_with_the_video_timeline(tmp_path):
    """The kick drum of the synthetic music lands on truth beats; an offset would smear it."""
    import librosa

    path = tmp_path / "v.mp4"
    truth = make_video(path, seconds=24.0, seed=6)
    for clip in clips_of(small_config(), path):
        start = clip["meta"]["clip"]["start"]
        onset = librosa.onset.onset_strength(y=clip["audio16"], sr=16000, hop_length=80)  # 5 ms frames
        beats = [b - start for b in truth["music"]["beat_times"] if start + 0.1 < b < start + 9.9]
        lags = range(-20, 21)
        score = [np.mean([onset[int(round(b * 200)) + lag] for b in beats]) for lag in lags]
        best_lag_ms = 5 * list(lags)[int(np.argmax(score))]
        assert abs(best_lag_ms) <= 30, best_lag_ms


def test_motion_is_positive_inside_shots(tmp_path):
    path = tmp_path / "v.mp4"
    make_video(path, seconds=12.0, shot_seconds=[12.0], seed=7)
    (clip,) = clips_of(small_config(), path)
    assert clip["meta"]["clip"]["cut_times"] == []
    assert float(np.median(clip["motion_25hz"])) > 0.0


def test_av1_decodes_through_the_pyav_fallback(tmp_path):
    from pipeline.synth.media import av1_encoder

    if av1_encoder() is None:
        pytest.skip("this PyAV build has no AV1 encoder to make the test file")
    path = tmp_path / "av1.mp4"
    truth = make_video(path, seconds=12.0, codec="av1", seed=8)
    clips = clips_of(small_config(), path)
    assert clips and all(c["meta"]["clip"]["decoder"] == "pyav" for c in clips)
    check_cuts(clips, truth, 1.0 / truth["fps"] + 1e-6)


def reference_frames(cfg, path, start):
    """Every frame converted to RGB, then the frame nearest each grid point of a clip from `start`
    (ties to the earlier frame): what segment keeps while converting only those."""
    from stages.decode import RGB, scaled_size, video_frames
    from stages.segment import center_crop

    video = probe_row(cfg, path)["meta"]["probe"]["video"]
    to_rgb = RGB(*scaled_size(video["width"], video["height"], cfg.frame_size))
    times, frames = zip(*((t, center_crop(to_rgb(f), cfg.frame_size)) for t, f in video_frames(str(path))))
    times = np.asarray(times)
    grid = start + np.arange(int(round(cfg.clip_seconds * cfg.frame_fps))) / cfg.frame_fps
    nearest = np.clip(np.searchsorted(times, grid), 0, len(times) - 1)
    earlier = np.clip(nearest - 1, 0, len(times) - 1)
    pick = np.where(np.abs(times[earlier] - grid) <= np.abs(times[nearest] - grid), earlier, nearest)
    return np.stack([frames[i] for i in pick])


@pytest.mark.parametrize("clip_seconds,snap,fps,vfr", [(4.0, 2.0, 25.0, False), (2.0, 2.0, 30.0, False), (3.0, 0.5, 25.0, True)])
def test_only_the_kept_frames_are_converted_and_they_are_the_nearest(tmp_path, clip_seconds, snap, fps, vfr):
    path = tmp_path / "v.mp4"
    make_video(path, seconds=14.0, fps=fps, vfr=vfr, seed=9)
    cfg = small_config(**{"clip_seconds": clip_seconds, "segment.snap_seconds": snap})
    stage = Segment(cfg, RunContext("unused", "test"))
    clips = [c for c in stage.process([probe_row(cfg, path)])]
    counters = stage.take_counters()
    assert len(clips) >= 3 and all(c["meta"]["clip"]["decoder"] == "pyav" for c in clips)
    assert any(c["meta"]["clip"]["start"] % clip_seconds > 1e-6 for c in clips[1:]) or snap < 1  # some clip starts on a cut
    for clip in clips:
        expected = reference_frames(cfg, path, clip["meta"]["clip"]["start"])
        assert np.array_equal(clip["frames"], expected), clip["key"]
    assert "frame_fallbacks" not in counters
    # RGB for a fraction of the frames: frame_fps of every fps, plus the grids of the starts cuts allow.
    assert counters["rgb_frames"] < counters["decoded_frames"] / 2, counters


def test_done_keys_are_not_emitted_again(tmp_path):
    path = tmp_path / "v.mp4"
    make_video(path, seconds=32.0, seed=10)
    cfg = small_config()
    keys = [c["key"] for c in clips_of(cfg, path)]
    again = [c["key"] for c in clips_of(cfg, path, done={keys[0]})]
    assert again == keys[1:]
