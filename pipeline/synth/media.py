"""Write synthetic videos and audio files with PyAV, plus a `<stem>.truth.json` sidecar.

The truth is what was encoded: frame pts come from our own timestamps, cut times are pts of the
first frame of each shot, and the music truth is the score `render_music` played.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from scipy.signal import butter, sosfilt

from pipeline.synth.music import PITCH_CLASSES, MusicSpec, render_music
from pipeline.synth.video import ShotRenderer, frame_times, plan_shot_lengths, plan_shots

AV1_ENCODERS = ("libsvtav1", "libaom-av1", "librav1e")
LAYOUT_CHANNELS = {"mono": 1, "stereo": 2, "5.1": 6}
VFR_TIME_BASE = Fraction(1, 90000)


def av1_encoder() -> str | None:
    """Name of the first AV1 encoder this PyAV build can open, or None."""
    for name in AV1_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    return None


def truth_path(path: str | Path) -> Path:
    """a/b.mp4 -> a/b.truth.json"""
    path = Path(path)
    return path.with_name(path.stem + ".truth.json")


def random_music(seconds: float, sample_rate: int, seed: int, silent: bool = False) -> MusicSpec:
    """The default music of a clip: tempo 80-150 BPM, any key, either mode, all from `seed`."""
    rng = np.random.default_rng([seed, 7])
    return MusicSpec(seconds=seconds, tempo_bpm=float(rng.integers(80, 151)),
                     tonic=PITCH_CLASSES[int(rng.integers(12))],
                     mode=str(rng.choice(["major", "minor"])),
                     sample_rate=sample_rate, seed=seed, silent=silent)


def to_layout(stereo: np.ndarray, layout: str, sample_rate: int) -> np.ndarray:
    """Map rendered stereo onto the requested channel layout (float32 [channels, n])."""
    if layout == "stereo":
        return stereo
    mid = stereo.mean(axis=0)
    if layout == "mono":
        return mid[None].astype(np.float32)
    if layout == "5.1":   # FL FR FC LFE BL BR
        lfe = sosfilt(butter(4, 120, "lowpass", fs=sample_rate, output="sos"), mid)
        left, right = stereo
        return np.stack([left, right, 0.7 * mid, lfe, 0.5 * left, 0.5 * right]).astype(np.float32)
    raise ValueError(f"audio layout must be one of stereo, mono, 5.1, none; got {layout!r}")


def _audio_frames(samples: np.ndarray, layout: str, sample_rate: int, frame_size: int = 1024):
    """Yield (start_time_s, AudioFrame) in AAC-sized chunks with pts in samples."""
    n = samples.shape[1]
    for start in range(0, n, frame_size):
        chunk = np.ascontiguousarray(samples[:, start:start + frame_size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        yield start / sample_rate, frame


def _add_audio(container, layout: str, sample_rate: int):
    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout = layout
    stream.sample_rate = sample_rate
    stream.bit_rate = 64000 * LAYOUT_CHANNELS[layout]
    return stream


def _add_video(container, codec: str, fps: float, width: int, height: int, vfr: bool):
    if codec == "h264":
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.options = {"preset": "veryfast", "crf": "23"}
    elif codec == "av1":
        name = av1_encoder()
        if name is None:
            raise RuntimeError("codec='av1' needs an AV1 encoder in PyAV "
                               f"(looked for {', '.join(AV1_ENCODERS)}); none is available")
        os.environ.setdefault("SVT_LOG", "1")   # SVT-AV1 prints a banner per file otherwise
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.options = {"preset": "10"} if name == "libsvtav1" else {"cpu-used": "8"}
    else:
        raise ValueError(f"codec must be 'h264' or 'av1', got {codec!r}")
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if vfr:
        stream.codec_context.time_base = VFR_TIME_BASE
        stream.time_base = VFR_TIME_BASE
    return stream


def _write_truth(path: Path, truth: dict) -> dict:
    truth_path(path).write_text(json.dumps(truth, indent=1, ensure_ascii=False), encoding="utf-8")
    return truth


def make_video(path, *, seconds=20.0, fps=25.0, width=320, height=240,
               shot_seconds: list[float] | None = None, music: MusicSpec | None = None,
               audio: str = "stereo", sample_rate: int = 48000, silent: bool = False,
               codec: str = "h264", vfr: bool = False, seed: int = 0) -> dict:
    """Write an mp4 with synthetic shots and music; return (and write beside it) the truth."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    times = frame_times(seconds, fps, vfr)
    lengths = list(shot_seconds) if shot_seconds else plan_shot_lengths(seconds, rng)
    shots = plan_shots(times, lengths, rng)
    renderer = ShotRenderer(width, height)

    audio_truth, music_truth, samples = None, None, None
    if audio != "none":
        if audio not in LAYOUT_CHANNELS:
            raise ValueError(f"audio must be one of stereo, mono, 5.1, none; got {audio!r}")
        spec = music or random_music(seconds, sample_rate, seed, silent)
        spec = MusicSpec(**{**spec.__dict__, "seconds": seconds, "sample_rate": sample_rate,
                            "silent": silent or spec.silent})
        stereo, music_truth = render_music(spec)
        samples = to_layout(stereo, audio, sample_rate)
        audio_truth = {"layout": audio, "sample_rate": sample_rate,
                       "channels": LAYOUT_CHANNELS[audio], "silent": bool(spec.silent)}

    with av.open(str(path), "w") as container:
        vstream = _add_video(container, codec, fps, width, height, vfr)
        astream = _add_audio(container, audio, sample_rate) if samples is not None else None
        pending = iter(_audio_frames(samples, audio, sample_rate)) if astream else iter(())
        next_audio = next(pending, None)
        shot_i = 0
        first_frame = [_first_index(times, s.start) for s in shots]
        for i, t in enumerate(times):
            while shot_i + 1 < len(shots) and t >= shots[shot_i + 1].start - 1e-9:
                shot_i += 1
            shot = shots[shot_i]
            frame = av.VideoFrame.from_ndarray(
                renderer.yuv420(shot, i - first_frame[shot_i]), format="yuv420p")
            if vfr:
                frame.pts, frame.time_base = int(round(t * 90000)), VFR_TIME_BASE
            else:
                frame.pts = i
            container.mux(vstream.encode(frame))
            # Interleave: audio up to this frame's time goes out alongside it.
            while next_audio is not None and next_audio[0] <= t:
                container.mux(astream.encode(next_audio[1]))
                next_audio = next(pending, None)
        container.mux(vstream.encode(None))
        while next_audio is not None:
            container.mux(astream.encode(next_audio[1]))
            next_audio = next(pending, None)
        if astream:
            container.mux(astream.encode(None))

    truth = {
        "path": str(path), "seconds": float(seconds),
        "fps": (len(times) / seconds) if vfr else float(fps),
        "width": width, "height": height, "codec": codec, "vfr": bool(vfr),
        "frame_times": times,
        "cut_times": [s.start for s in shots[1:]],
        "shots": [{"start": s.start, "end": s.end, "texture": s.texture,
                   "mean_luma": round(s.luma, 1)} for s in shots],
        "audio": audio_truth, "music": music_truth,
    }
    return _write_truth(path, truth)


def _first_index(times: list[float], start: float) -> int:
    return int(np.searchsorted(np.asarray(times), start - 1e-9))


def make_audio_only(path, seconds=12.0, music: MusicSpec | None = None, seed=0,
                    layout: str = "stereo", sample_rate: int = 48000) -> dict:
    """Write an AAC-only .m4a (no video stream) and its truth sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = music or random_music(seconds, sample_rate, seed)
    spec = MusicSpec(**{**spec.__dict__, "seconds": seconds, "sample_rate": sample_rate})
    stereo, music_truth = render_music(spec)
    samples = to_layout(stereo, layout, sample_rate)
    with av.open(str(path), "w") as container:
        stream = _add_audio(container, layout, sample_rate)
        for _, frame in _audio_frames(samples, layout, sample_rate):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    truth = {
        "path": str(path), "seconds": float(seconds), "fps": None, "width": None,
        "height": None, "codec": None, "vfr": False, "frame_times": [], "cut_times": [],
        "shots": [],
        "audio": {"layout": layout, "sample_rate": sample_rate,
                  "channels": LAYOUT_CHANNELS[layout], "silent": bool(spec.silent)},
        "music": music_truth,
    }
    return _write_truth(path, truth)
