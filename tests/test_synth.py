"""The synthetic media must be what its truth says: checked by decoding, not by trusting the writer."""
from __future__ import annotations

import json
from pathlib import Path

import av
import librosa
import mir_eval
import numpy as np
import pytest

from pipeline.synth import (BAD_INPUT_CASES, MusicSpec, av1_encoder, make_audio_only,
                            make_bad_inputs, make_video, render_music, truth_path)
from pipeline.synth.__main__ import main as synth_main
from pipeline.synth.music import PITCH_CLASSES

SR = 22050


# ---------- fixtures (module-scoped: tests/conftest.py belongs to the pipeline tests) ----------

@pytest.fixture(scope="module")
def synth_video(tmp_path_factory) -> dict:
    """A 20 s 320x240 25 fps H.264 + stereo AAC clip, 100 BPM E major; its truth dict."""
    path = tmp_path_factory.mktemp("synth_video") / "clip.mp4"
    music = MusicSpec(tempo_bpm=100, tonic="E", mode="major", seed=3)
    return make_video(path, seconds=20.0, music=music, seed=3)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict:
    """{case_name: Path} for every case of make_bad_inputs."""
    return make_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


# ---------- helpers ----------

def decode_video(path) -> tuple[np.ndarray, np.ndarray]:
    """(pts seconds [n], luma frames [n, h/2, w/2] int16); every other pixel is plenty here."""
    with av.open(str(path)) as c:
        frames = [(float(f.pts * f.time_base), f.to_ndarray(format="gray")[::2, ::2])
                  for f in c.decode(video=0)]
    return np.array([t for t, _ in frames]), np.stack([y for _, y in frames]).astype(np.int16)


def decode_audio(path) -> tuple[np.ndarray, int]:
    """([channels, n] float32, sample_rate) of the first audio stream."""
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].sample_rate
        chunks = [f.to_ndarray() for f in c.decode(audio=0)]
    return np.concatenate(chunks, axis=1), rate


def chord_pcs(label: str) -> set[int]:
    root, quality = label.split(":")
    r = PITCH_CLASSES.index(root)
    return {r, (r + (4 if quality == "maj" else 3)) % 12, (r + 7) % 12}


def mono22k(audio: np.ndarray, sr: int) -> np.ndarray:
    return librosa.resample(audio.mean(axis=0), orig_sr=sr, target_sr=SR)


# ---------- music ----------

def test_music_truth_is_an_exact_score():
    spec = MusicSpec(seconds=20.0, tempo_bpm=96, tonic="D", mode="minor", seed=5)
    audio, truth = render_music(spec)
    assert audio.shape == (2, 20 * 48000) and audio.dtype == np.float32
    assert abs(np.abs(audio).max() - 0.8) < 1e-3
    beat = 60 / 96
    assert truth["beat_times"] == [k * beat for k in range(len(truth["beat_times"]))]
    assert truth["beat_times"][-1] < 20.0 <= truth["beat_times"][-1] + beat
    assert truth["downbeat_times"] == truth["beat_times"][::4]
    mir_eval.key.validate_key(truth["key"])
    assert truth["key"] == "D minor"
    chords = truth["chords"]
    mir_eval.chord.encode_many([c["label"] for c in chords])
    assert chords[0]["start"] == 0 and chords[-1]["end"] == 20.0
    assert all(a["end"] == b["start"] for a, b in zip(chords, chords[1:]))
    assert all(abs(c["start"] / beat - round(c["start"] / beat)) < 1e-9 for c in chords)
    assert chords[0]["label"] == chords[-1]["label"] == "D:min"      # tonic first and last
    assert [c["label"] for c in chords[:4]] == ["D:min", "G:min", "A:maj", "D:min"]  # i iv V i (merged across cycles)


def test_music_is_deterministic_and_silent_is_zero():
    a, ta = render_music(MusicSpec(seconds=4, seed=1))
    b, tb = render_music(MusicSpec(seconds=4, seed=1))
    c, _ = render_music(MusicSpec(seconds=4, seed=2))
    assert np.array_equal(a, b) and ta == tb and not np.array_equal(a, c)
    s, ts = render_music(MusicSpec(seconds=4, seed=1, silent=True))
    assert not s.any() and ts == ta


def test_custom_progression_and_bad_numerals():
    _, t = render_music(MusicSpec(seconds=16, tempo_bpm=120, tonic="G", mode="major",
                                  progression=["I", "ii", "IV", "V"], beats_per_chord=2))
    assert [c["label"] for c in t["chords"][:4]] == ["G:maj", "A:min", "C:maj", "D:maj"]
    assert t["chords"][1]["start"] == 1.0 and t["chords"][-1]["label"] == "G:maj"
    with pytest.raises(ValueError):
        render_music(MusicSpec(progression=["I", "vii°"]))


@pytest.mark.parametrize("tempo,tonic,mode", [(84, "C", "major"), (142, "F#", "minor")])
def test_music_beats_chords_key_are_audible(tempo, tonic, mode):
    audio, truth = render_music(MusicSpec(seconds=20, tempo_bpm=tempo, tonic=tonic, mode=mode,
                                          seed=tempo))
    y = mono22k(audio, 48000)
    # Every beat (after the first, which has no preceding frame) has an onset peak within 30 ms.
    env = librosa.onset.onset_strength(y=y, sr=SR, hop_length=256)
    onsets = librosa.onset.onset_detect(onset_envelope=env, sr=SR, hop_length=256, units="time")
    errors = [np.abs(onsets - b).min() for b in truth["beat_times"][1:]]
    assert max(errors) <= 0.030
    # The metrical level is unambiguous: a generic beat tracker finds the quarter note.
    bpm, _ = librosa.beat.beat_track(y=y, sr=SR)
    assert abs(float(np.atleast_1d(bpm)[0]) / tempo - 1) < 0.05
    # Each chord's three pitch classes are among the 4 strongest chroma bins of its segment.
    chroma = librosa.feature.chroma_cqt(y=y, sr=SR, hop_length=512)
    times = librosa.frames_to_time(np.arange(chroma.shape[1]), sr=SR, hop_length=512)
    for c in truth["chords"]:
        seg = chroma[:, (times >= c["start"] + 0.05) & (times < c["end"] - 0.05)].mean(axis=1)
        assert chord_pcs(c["label"]) <= set(np.argsort(seg)[-4:]), c
    overall = np.argsort(chroma.mean(axis=1))[::-1]
    assert PITCH_CLASSES.index(tonic) in overall[:2]


# ---------- video ----------

def test_video_streams_match_truth(synth_video):
    t = synth_video
    assert truth_path(t["path"]).exists()
    assert json.loads(truth_path(t["path"]).read_text()) == json.loads(json.dumps(t))
    with av.open(t["path"]) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.width, v.height) == ("h264", 320, 240)
        assert v.codec_context.pix_fmt == "yuv420p" and v.average_rate == 25
        assert (a.codec_context.name, a.sample_rate, a.channels, a.layout.name) == \
            ("aac", 48000, 2, "stereo")
    pts, _ = decode_video(t["path"])
    assert len(pts) == len(t["frame_times"]) == 500
    assert np.allclose(pts, t["frame_times"], atol=1e-6)
    assert abs(pts[-1] + 1 / 25 - t["seconds"]) <= 1 / 25
    samples, rate = decode_audio(t["path"])
    assert abs(samples.shape[1] / rate - t["seconds"]) < 1024 / rate   # one AAC frame at most
    assert t["audio"] == {"layout": "stereo", "sample_rate": 48000, "channels": 2, "silent": False}
    assert t["music"]["key"] == "E major" and t["music"]["tempo_bpm"] == 100


def test_decoded_audio_is_aligned_with_the_music_truth(synth_video):
    """AAC priming must be compensated: decoded audio lines up with the rendered score."""
    samples, rate = decode_audio(synth_video["path"])
    rendered, _ = render_music(MusicSpec(seconds=20, tempo_bpm=100, tonic="E", mode="major",
                                         seed=3))
    a, b = samples[0, : 2 * rate], rendered[0, : 2 * rate]
    lags = np.arange(-200, 201)
    corr = [np.dot(a[200:-200], b[200 + k:len(b) - 200 + k]) for k in lags]
    assert lags[int(np.argmax(corr))] == 0
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.05 * np.sqrt(np.mean(b ** 2)) + 1e-3


def assert_cuts_exact(truth):
    pts, luma = decode_video(truth["path"])
    assert np.allclose(pts, truth["frame_times"], atol=1e-6)
    diff = np.array([np.abs(b - a).mean() for a, b in zip(luma, luma[1:])])  # frame i -> i+1
    mean = luma.reshape(len(luma), -1).mean(axis=1)
    cut_frames = [int(np.argmin(np.abs(pts - c))) for c in truth["cut_times"]]
    assert [pts[i] for i in cut_frames] == pytest.approx(truth["cut_times"], abs=1e-6)
    spikes = set(int(i) + 1 for i in np.flatnonzero(diff > 20))
    assert spikes == set(cut_frames)
    assert all(abs(mean[i] - mean[i - 1]) > 30 for i in cut_frames)
    assert np.delete(diff, [i - 1 for i in cut_frames]).max() < 8     # motion, never a cut
    assert np.median(diff) > 0.3                                        # but there is motion


def test_cut_truth_is_real(synth_video):
    assert len(synth_video["cut_times"]) >= 3
    shots = synth_video["shots"]
    assert [s["start"] for s in shots[1:]] == synth_video["cut_times"]
    assert all(2.0 - 0.04 <= s["end"] - s["start"] for s in shots)
    assert_cuts_exact(synth_video)


def test_explicit_shots_and_vfr(tmp_path):
    t = make_video(tmp_path / "v.mp4", seconds=6, shot_seconds=[1.5, 2.0, 2.5], audio="none",
                   vfr=True, seed=4)
    steps = np.round(np.diff(t["frame_times"]) * 90000).astype(int)
    assert set(steps) == {3000, 4500}                                   # irregular pts
    assert t["vfr"] and t["audio"] is None and t["music"] is None
    # Cuts land on the first frame at or after 1.5 s and 3.5 s.
    ft = np.array(t["frame_times"])
    assert t["cut_times"] == [ft[ft >= 1.5 - 1e-9][0], ft[ft >= 3.5 - 1e-9][0]]
    assert_cuts_exact(t)
    with av.open(t["path"]) as c:
        assert not c.streams.audio


def test_bad_arguments_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="audio"):
        make_video(tmp_path / "x.mp4", seconds=1, audio="7.1")
    with pytest.raises(ValueError, match="codec"):
        make_video(tmp_path / "y.mp4", seconds=1, codec="vp9")


# ---------- bad inputs ----------

def test_every_bad_input_case_exists(bad_inputs):
    expected = set(BAD_INPUT_CASES) - ({"av1"} if av1_encoder() is None else set())
    assert set(bad_inputs) == expected
    assert all(Path(p).exists() for p in bad_inputs.values())
    for name in expected - {"zero_byte", "truncated", "text_as_mp4"}:
        truth = json.loads(truth_path(bad_inputs[name]).read_text(encoding="utf-8"))
        assert Path(truth["path"]) == bad_inputs[name]


def test_unreadable_cases_are_unreadable(bad_inputs):
    assert bad_inputs["zero_byte"].stat().st_size == 0
    assert bad_inputs["text_as_mp4"].read_text().startswith("This is not a video")
    trunc = bad_inputs["truncated"]
    assert 0 < trunc.stat().st_size < 0.5 * bad_inputs["duplicate_a"].stat().st_size
    with open(trunc, "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"                     # looks like an mp4 ...
    for name in ("zero_byte", "text_as_mp4", "truncated"):
        with pytest.raises(av.error.FFmpegError):              # ... but none of them opens
            with av.open(str(bad_inputs[name])) as c:
                next(c.decode(video=0))


def stream_summary(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0].codec_context.name if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        return v, (a.channels, a.sample_rate, a.layout.name) if a else None, c.duration / 1e6


def test_media_cases_have_their_property(bad_inputs):
    assert stream_summary(bad_inputs["no_audio"])[:2] == ("h264", None)
    assert stream_summary(bad_inputs["audio_only"])[:2] == (None, (2, 48000, "stereo"))
    assert stream_summary(bad_inputs["surround"])[1] == (6, 48000, "5.1")
    assert stream_summary(bad_inputs["mono_8k"])[1] == (1, 8000, "mono")
    v, a, dur = stream_summary(bad_inputs["tiny"])
    assert v == "h264" and a is not None and abs(dur - 0.5) < 0.1
    silent, _ = decode_audio(bad_inputs["silent"])
    loud, _ = decode_audio(bad_inputs["duplicate_a"])
    assert np.abs(silent).max() < 1e-4 and np.sqrt(np.mean(loud ** 2)) > 0.02
    assert json.loads(truth_path(bad_inputs["silent"]).read_text())["audio"]["silent"] is True
    pts, _ = decode_video(bad_inputs["vfr"])
    assert len(set(np.round(np.diff(pts), 4))) == 2
    assert bad_inputs["duplicate_a"].read_bytes() == bad_inputs["duplicate_b"].read_bytes()
    assert bad_inputs["duplicate_a"].name != bad_inputs["duplicate_b"].name
    u = bad_inputs["unicode_path"]
    assert (u.parent.name, u.name) == ("ünï cödé dir", "vidéo à écouter 🎵.mp4")
    assert stream_summary(u)[0] == "h264"
    assert truth_path(u).name == "vidéo à écouter 🎵.truth.json"


def test_av1_case(bad_inputs):
    if av1_encoder() is None:
        pytest.skip("this PyAV build has no AV1 encoder (libsvtav1/libaom-av1/librav1e)")
    v, a, dur = stream_summary(bad_inputs["av1"])
    assert v in ("libdav1d", "av1", "libaom-av1") and a == (2, 48000, "stereo")
    with av.open(str(bad_inputs["av1"])) as c:
        assert c.streams.video[0].codec_context.codec.name in ("libdav1d", "av1", "libaom-av1")
        assert sum(1 for _ in c.decode(video=0)) == 300


def test_audio_only_file(tmp_path):
    t = make_audio_only(tmp_path / "a.m4a", seconds=3, music=MusicSpec(tonic="C", mode="major"))
    with av.open(t["path"]) as c:
        assert not c.streams.video and c.streams.audio[0].codec_context.name == "aac"
    assert t["music"]["key"] == "C major" and t["music"]["seconds"] == 3


# ---------- CLI ----------

def test_cli_writes_varied_clips(tmp_path, capsys):
    assert synth_main([str(tmp_path), "--videos", "3", "--seconds", "5", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    truths = [json.loads(truth_path(tmp_path / f"clip_{i:03d}.mp4").read_text()) for i in range(3)]
    assert all(80 <= t["music"]["tempo_bpm"] <= 150 for t in truths)
    assert len({(t["music"]["tempo_bpm"], t["music"]["key"]) for t in truths}) == 3
    assert all(str(tmp_path / f"clip_{i:03d}.mp4") in lines[i] for i in range(3))
