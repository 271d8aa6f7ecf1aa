"""music_dsp against ground truth: synthetic music with exactly known tempo, beats, key and
chords (pipeline.synth.music), plus silence, noise, bad input and the output contract."""
from __future__ import annotations

import json

import mir_eval
import numpy as np
import pytest

from bench.music21_accuracy import SYNTH_SPECS, score_clip, synthetic_clips
from pipeline.config import Config, MusicDSPConfig
from pipeline.stage import Reject
from stages.music_beats import beat_grid, fit_tempo
from stages.music_dsp import SR, MusicDSP, analyze_clip, loudness

CLIP = 10.0
N_GRID = 250


@pytest.fixture(scope="module")
def stage() -> MusicDSP:
    s = MusicDSP(Config())
    s.setup()
    return s


@pytest.fixture(scope="module")
def synthetic(stage):
    """(name, truth, music, scores) for every spec of the synthetic set, through the stage."""
    out = []
    for name, y, truth in synthetic_clips(CLIP):
        [row] = list(stage.process([_row(name, y)]))
        assert not isinstance(row, Reject), row
        out.append((name, truth, row, score_clip(row["meta"]["music"], truth)))
    return out


def _row(key: str, y: np.ndarray) -> dict:
    return {"key": key, "meta": {"source": {"source_id": "src", "path": "/x.mp4"},
                                 "clip": {"index": 0, "is_last": True}},
            "audio16": np.asarray(y, np.float32)}


def _noise(dbfs: float, seconds: float = CLIP, seed: int = 0) -> np.ndarray:
    y = np.random.default_rng(seed).standard_normal(int(seconds * SR))
    return (y * 10 ** (dbfs / 20)).astype(np.float32)


def test_the_synthetic_set_is_varied():
    tempos = [s["tempo_bpm"] for s in SYNTH_SPECS]
    assert len(SYNTH_SPECS) >= 12 and min(tempos) <= 80 and max(tempos) >= 150
    assert {s["mode"] for s in SYNTH_SPECS} == {"major", "minor"}
    assert len({s["tonic"] for s in SYNTH_SPECS}) == 12


def test_tempo_within_two_percent(synthetic):
    for name, truth, row, sc in synthetic:
        assert sc["tempo_ok"], (name, row["meta"]["music"]["tempo_bpm"], truth["tempo_bpm"])


def test_key_exact(synthetic):
    for name, truth, row, sc in synthetic:
        assert sc["key_weighted"] == 1.0, (name, row["meta"]["music"]["key"], truth["key"])


def test_beat_f_measure(synthetic):
    whole = [sc["beat_f"] for *_, sc in synthetic]  # every beat of the clip, 70 ms window
    trimmed = [sc["beat_f_trim5"] for *_, sc in synthetic]  # mir_eval's default: skip the first 5 s
    for scores in (whole, trimmed):
        assert np.mean(scores) >= 0.9 and min(scores) >= 0.8, scores


def test_chords_majmin(synthetic):
    scores = [sc["chord_majmin"] for *_, sc in synthetic]
    assert np.mean(scores) >= 0.8, scores


def test_chord_segments_tile_the_clip(synthetic):
    min_len = MusicDSPConfig().chord_min_seconds
    for name, _, row, _ in synthetic:
        chords = row["meta"]["music"]["chords"]
        assert chords[0]["start"] == 0.0 and chords[-1]["end"] == CLIP
        for a, b in zip(chords, chords[1:]):
            assert a["end"] == b["start"] and a["label"] != b["label"]
        assert all(c["end"] - c["start"] >= min_len - 1e-9 for c in chords), chords
        labels = [c["label"] for c in chords]
        mir_eval.chord.validate(labels, labels)  # raises on a label that is not Harte


def test_rhythm_arrays(synthetic):
    for name, _, row, _ in synthetic:
        onset, beat = row["onset_25hz"], row["beat_25hz"]
        music = row["meta"]["music"]
        assert onset.dtype == beat.dtype == np.float32 and onset.shape == beat.shape == (N_GRID,)
        assert onset.min() >= 0.0 and onset.max() == pytest.approx(1.0)
        assert set(np.unique(beat)) <= {0.0, 1.0} and beat.sum() == music["beat_count"] == len(music["beat_times"])
        nearest = np.minimum(np.round(np.array(music["beat_times"]) * 25).astype(int), N_GRID - 1)
        assert np.array_equal(np.flatnonzero(beat), nearest)
        # The kick on every beat is the strongest onset there.
        assert onset[beat > 0].mean() > 3 * onset[beat == 0].mean()


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def test_meta_is_plain_json(synthetic):
    for name, _, row, _ in synthetic:
        music = row["meta"]["music"]
        assert _plain(music), music
        json.dumps(row["meta"], allow_nan=False)
        assert {"tempo_bpm", "beat_times", "beat_count", "key", "tonic", "mode", "key_confidence",
                "chords", "loudness_dbfs", "peak_dbfs", "silence_ratio", "provenance"} <= set(music)
        assert music["key"] == f"{music['tonic']} {music['mode']}" and 0 < music["key_confidence"] <= 1
        assert music["provenance"]["librosa"] and music["provenance"]["method"]


def test_silent_clip_is_rejected(stage):
    [out] = list(stage.process([_row("s_0", np.zeros(int(CLIP * SR), np.float32))]))
    assert isinstance(out, Reject) and (out.stage, out.reason, out.level) == ("music_dsp", "silent", "clip")
    assert out.key == "s_0" and out.source_id == "src" and out.is_last_clip


def test_noise_below_the_silence_floor_is_rejected(stage):
    [out] = list(stage.process([_row("n_0", _noise(-75.0))]))
    assert isinstance(out, Reject) and out.reason == "silent"


def test_quiet_noise_above_the_floor_is_analysed(stage):
    [out] = list(stage.process([_row("n_1", _noise(-45.0))]))
    assert not isinstance(out, Reject)
    music = out["meta"]["music"]
    assert music["loudness_dbfs"] == pytest.approx(-45.0, abs=0.5) and music["silence_ratio"] == 0.0
    assert music["key_confidence"] < 0.5  # no tonal centre in white noise
    assert out["onset_25hz"].shape == out["beat_25hz"].shape == (N_GRID,)
    json.dumps(out["meta"], allow_nan=False)


def test_music_half_silent_is_kept_mostly_silent_is_rejected(stage, synthetic):
    _, y, _ = synthetic_clips(CLIP)[0]
    keep = y.copy()
    keep[int(6 * SR):] = 0.0  # 40 % silent
    drop = y.copy()
    drop[int(3 * SR):] = 0.0  # 70 % silent
    a, b = stage.process([_row("a_0", keep), _row("b_0", drop)])
    assert not isinstance(a, Reject) and isinstance(b, Reject) and b.reason == "silent"
    beats = a["meta"]["music"]["beat_times"]
    assert beats and max(beats) < 6.1  # no beats invented in the silent tail


def test_level_does_not_change_the_analysis(synthetic):
    name, y, truth = synthetic_clips(CLIP)[2]
    quiet = analyze_clip(y * 10 ** (-30 / 20), MusicDSPConfig(), CLIP).music
    loud = analyze_clip(y, MusicDSPConfig(), CLIP).music
    assert quiet["loudness_dbfs"] == pytest.approx(loud["loudness_dbfs"] - 30, abs=0.05)
    assert quiet["key"] == loud["key"] and quiet["tempo_bpm"] == pytest.approx(loud["tempo_bpm"], rel=0.005)


def test_bad_input_becomes_dsp_error_and_the_batch_goes_on(stage):
    nan = _noise(-20.0)
    nan[100] = np.nan
    good = _noise(-20.0, seed=1)
    no_audio = {"key": "x_0", "meta": {}}
    out = list(stage.process([_row("nan_0", nan), no_audio, _row("ok_0", good)]))
    assert [getattr(o, "reason", None) for o in out] == ["dsp_error", "dsp_error", None]
    assert "NaN" in out[0].detail and "audio16" in out[1].detail


def test_short_clip_is_padded_to_the_grid(stage):
    _, y, _ = synthetic_clips(CLIP)[1]
    [out] = list(stage.process([_row("short_0", y[: int(9.5 * SR)])]))
    assert out["onset_25hz"].shape == out["beat_25hz"].shape == (N_GRID,)


def test_loudness_reference_levels():
    t = np.arange(SR) / SR
    sine = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    level = loudness(sine, SR, -60.0)
    assert level["loudness_dbfs"] == pytest.approx(-3.01, abs=0.02) and level["peak_dbfs"] == pytest.approx(0, abs=0.01)
    assert loudness(np.zeros(SR, np.float32), SR, -60.0)["silence_ratio"] == 1.0


def test_tempo_fit_survives_a_missed_beat():
    beats = np.arange(12) * 0.5 + 0.1
    assert fit_tempo(np.delete(beats, 5)) == pytest.approx(120.0)
    assert fit_tempo(beats[:2]) is None
    grid = beat_grid(np.array([0.0, 0.519, 9.99]), N_GRID)
    assert list(np.flatnonzero(grid)) == [0, 13, 249]


def test_stage_contract():
    assert MusicDSP.name == "music_dsp" and MusicDSP.resources.num_gpus == 0
    assert "audio16" in MusicDSP.consumes
