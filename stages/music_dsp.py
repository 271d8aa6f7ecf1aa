"""music_dsp: measured musical attributes of each clip, on CPU (librosa / scipy).

Per clip: tempo and beats (librosa beat tracker, tempo from a least-squares fit of the beats),
key (CQT chroma vs 24 key profiles, helped by the chords), chords (triad templates + Viterbi),
loudness, and two 25 Hz rhythm channels aligned with the VAE latent frames (frame i <-> time
i / 25 s). Accuracy against ground truth: tests/test_music_dsp.py, bench/music21_accuracy.py.
`analyze_clip` is the whole analysis as a plain function; the stage wraps it with rejects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import librosa
import numpy as np

from pipeline.config import MusicDSPConfig
from pipeline.stage import Reject, Resources, Row, Stage
from stages.music_beats import beat_grid, fit_tempo, onset_envelope, onset_grid, track_beats
from stages.music_chords import cadence_triads, decode_chords, triad_seconds
from stages.music_key import estimate_key

SR = 16000
GRID_FPS = 25.0
ONSET_HOP = 160  # 10 ms onset frames for the beat tracker
ONSET_NFFT = 1024
CHROMA_HOP = 512  # 32 ms chroma frames for key and chords
CQT_FMIN_MIDI = 24  # C1
CQT_OCTAVES = 7
CQT_BINS_PER_OCTAVE = 36
BASS_OCTAVES = 2  # C1-B2
LOUDNESS_FRAME_SECONDS = 0.05
EPS_DB = -120.0  # what digital silence reads as, instead of -inf


@dataclass
class MusicAnalysis:
    music: dict  # JSON-able attributes, meta["music"]
    onset_25hz: np.ndarray  # float32 [round(clip_seconds * 25)], 0..1
    beat_25hz: np.ndarray  # float32, 1.0 at the frame nearest each beat


def _db(x: float) -> float:
    return float(max(EPS_DB, 20.0 * np.log10(x))) if x > 0 else EPS_DB


def loudness(y: np.ndarray, sr: int, silence_dbfs: float) -> dict:
    """RMS and peak level in dBFS (full-scale square wave = 0 dB) and the fraction of
    ~50 ms frames whose RMS is below `silence_dbfs`."""
    frame = max(1, int(round(LOUDNESS_FRAME_SECONDS * sr)))
    n = len(y) // frame
    if n == 0:
        frames_db = np.array([_db(float(np.sqrt(np.mean(y**2)))) if len(y) else EPS_DB])
    else:
        ms = np.mean(y[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1)
        frames_db = np.maximum(EPS_DB, 10.0 * np.log10(np.maximum(ms, 1e-30)))
    rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) if len(y) else 0.0
    return {
        "loudness_dbfs": round(_db(rms), 2),
        "peak_dbfs": round(_db(float(np.max(np.abs(y))) if len(y) else 0.0), 2),
        "silence_ratio": round(float(np.mean(frames_db < silence_dbfs)), 4),
    }


def fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """Exactly n samples: trimmed, or zero-padded at the end."""
    if len(y) >= n:
        return y[:n]
    return np.pad(y, (0, n - len(y)))


def chroma_cqt(y: np.ndarray, sr: int, tuning: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Energy chroma [12, T] of the whole CQT range (C1-B7) and of its two lowest octaves (the
    bass, C1-B2), one frame per CHROMA_HOP samples, not normalised."""
    fmin = librosa.midi_to_hz(CQT_FMIN_MIDI)
    cqt = np.abs(librosa.cqt(
        y, sr=sr, hop_length=CHROMA_HOP, fmin=fmin, n_bins=CQT_OCTAVES * CQT_BINS_PER_OCTAVE,
        bins_per_octave=CQT_BINS_PER_OCTAVE, tuning=tuning,
    ))
    kw = dict(sr=sr, hop_length=CHROMA_HOP, fmin=fmin, bins_per_octave=CQT_BINS_PER_OCTAVE,
              n_octaves=CQT_OCTAVES, norm=None)
    full = librosa.feature.chroma_cqt(C=cqt, **kw)
    cqt[BASS_OCTAVES * CQT_BINS_PER_OCTAVE:] = 0.0
    return full, librosa.feature.chroma_cqt(C=cqt, **kw)


def pitch_class_profile(full: np.ndarray, bass: np.ndarray, voiced: np.ndarray, bass_weight: float) -> np.ndarray:
    """Mean energy chroma of the voiced frames (sum 1) plus `bass_weight` x the same for the
    bass octaves: the tonic sits in the bass more often than any other pitch class."""
    if not voiced.any():
        return np.zeros(12)
    out = np.zeros(12)
    for chroma, w in ((full, 1.0), (bass, bass_weight)):
        m = chroma[:, voiced].mean(axis=1)
        if m.sum() > 0:
            out += w * m / m.sum()
    return out


def trim_silent_edges(beats: np.ndarray, y: np.ndarray, sr: int, silence_dbfs: float) -> np.ndarray:
    """Drop leading and trailing beats that fall in silent 50 ms frames (the beat tracker runs
    its grid over the whole clip, also over a silent lead-in or tail)."""
    frame = int(round(LOUDNESS_FRAME_SECONDS * sr))
    idx = np.minimum((beats * sr).astype(np.int64) // frame, max(0, len(y) // frame - 1))
    ms = np.array([np.mean(y[i * frame:(i + 1) * frame].astype(np.float64) ** 2) for i in idx])
    loud = 10.0 * np.log10(np.maximum(ms, 1e-30)) >= silence_dbfs
    if not loud.any():
        return beats[:0]
    first, last = np.flatnonzero(loud)[[0, -1]]
    return beats[first:last + 1]


def analyze_clip(y: np.ndarray, cfg: MusicDSPConfig, clip_seconds: float, sr: int = SR) -> MusicAnalysis:
    """All measured attributes of one mono clip at `sr` (16 kHz unless told)."""
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(y)):
        raise ValueError("audio contains NaN or infinite samples")
    y = fit_length(y, int(round(clip_seconds * sr)))
    n_grid = int(round(clip_seconds * GRID_FPS))
    level = loudness(y, sr, cfg.silence_dbfs)

    oenv = onset_envelope(y, sr, ONSET_HOP, ONSET_NFFT)
    beats, quantised_tempo = track_beats(oenv, sr, ONSET_HOP, cfg.start_bpm, cfg.tightness)
    # The envelope's last frame sits on the clip end, where the tracker can put a beat it has no
    # evidence for: keep detections inside the clip, then undo the onset lag (an onset at the
    # very start stays at 0).
    beats = beats[beats < clip_seconds]
    beats = np.maximum(beats - cfg.onset_latency_seconds, 0.0)
    beats = trim_silent_edges(beats, y, sr, cfg.silence_dbfs)
    tempo = fit_tempo(beats)
    if tempo is None and quantised_tempo > 0:
        tempo = quantised_tempo

    full, bass = chroma_cqt(y, sr, None if cfg.estimate_tuning else 0.0)
    rms = librosa.feature.rms(y=y, frame_length=2 * CHROMA_HOP, hop_length=CHROMA_HOP)[0]
    m = min(len(rms), full.shape[1])
    full, bass, rms = full[:, :m], bass[:, :m], rms[:m]
    voiced = 20.0 * np.log10(np.maximum(rms, 1e-12)) > cfg.silence_dbfs
    chords = decode_chords(
        full, voiced, CHROMA_HOP / sr, clip_seconds, cfg.chord_min_seconds, cfg.chord_stay_prob
    )
    key = estimate_key(
        pitch_class_profile(full, bass, voiced, cfg.key_bass_weight), cfg.key_profile,
        triad_seconds(chords), cfg.key_harmony_weight, cadence_triads(chords), cfg.key_cadence_weight,
    )

    music = {
        "tempo_bpm": round(float(tempo), 2) if tempo else None,
        "beat_times": [round(float(t), 3) for t in beats],
        "beat_count": int(len(beats)),
        "key": key["key"],
        "tonic": key["tonic"],
        "mode": key["mode"],
        "key_confidence": round(key["key_confidence"], 3),
        "chords": chords,
        **level,
        "provenance": {
            "method": (
                f"beats: librosa onset strength (hop {ONSET_HOP} @ {sr} Hz) + beat_track; tempo: "
                "least-squares slope of beat times; key: CQT chroma (+bass) vs "
                f"{cfg.key_profile} profiles + chord functions + first/last chord; chords: "
                "24 triad templates + N, Viterbi; loudness: RMS/peak dBFS"
            ),
            "librosa": librosa.__version__,
        },
    }
    return MusicAnalysis(
        music=music,
        onset_25hz=onset_grid(oenv, sr / ONSET_HOP, n_grid, GRID_FPS),
        beat_25hz=beat_grid(beats, n_grid, GRID_FPS),
    )


class MusicDSP(Stage):
    """Adds meta["music"] and the 25 Hz `onset_25hz` / `beat_25hz` arrays to each clip row.
    Reads `audio16` (float32 [n], 16 kHz mono); silent clips become "silent" rejects."""

    name = "music_dsp"
    # Runs fused with segment in one task (runner.stage_groups), one clip at a time.
    resources = Resources(num_cpus=1, batch_size=1)
    consumes = ("audio16",)

    def setup(self) -> None:
        # The first call JIT-compiles librosa's numba kernels (~3 s): pay it here, once per
        # worker, on a clip of the real length (a click track on an A minor triad).
        seconds = float(self.config.clip_seconds)
        t = np.arange(int(seconds * SR)) / SR
        tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 261.63, 329.63))
        warm = (0.1 * tone * (np.mod(t, 0.5) < 0.2)).astype(np.float32)
        analyze_clip(warm, self.config.music_dsp, seconds)

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        cfg: MusicDSPConfig = self.config.music_dsp
        clip_seconds = float(self.config.clip_seconds)
        for row in rows:
            try:
                y = row.get("audio16")
                if y is None:
                    raise ValueError("row has no audio16 array")
                y = np.asarray(y, dtype=np.float32).reshape(-1)
                level = loudness(fit_length(y, int(round(clip_seconds * SR))), SR, cfg.silence_dbfs)
                if level["silence_ratio"] > cfg.max_silence_ratio:
                    yield Reject.for_row(
                        self.name, row, "silent",
                        f"{level['silence_ratio']:.0%} of 50 ms frames below {cfg.silence_dbfs} dBFS "
                        f"(max {cfg.max_silence_ratio:.0%}); clip RMS {level['loudness_dbfs']} dBFS",
                    )
                    continue
                result = analyze_clip(y, cfg, clip_seconds)
            except Exception as exc:  # one bad clip never stops the run
                yield Reject.for_row(self.name, row, "dsp_error", f"{type(exc).__name__}: {exc}")
                continue
            row["meta"]["music"] = result.music
            row["onset_25hz"] = result.onset_25hz
            row["beat_25hz"] = result.beat_25hz
            yield row
