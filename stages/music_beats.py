"""Beats and tempo: librosa onset strength + dynamic-programming beat tracker, tempo from a
least-squares fit of beat time against beat index, and the 25 Hz grids the shards store."""
from __future__ import annotations

import librosa
import numpy as np


def onset_envelope(y: np.ndarray, sr: int, hop: int, n_fft: int) -> np.ndarray:
    """Spectral-flux onset strength (log-mel, median over bands), one value per `hop` samples.
    Frame j is centred on time j * hop / sr."""
    return librosa.onset.onset_strength(
        y=y, sr=sr, hop_length=hop, n_fft=n_fft, n_mels=64, fmax=sr / 2, aggregate=np.median
    ).astype(np.float32)


def track_beats(
    oenv: np.ndarray, sr: int, hop: int, start_bpm: float, tightness: float
) -> tuple[np.ndarray, float]:
    """Beat times in seconds and librosa's (frame-quantised) tempo estimate."""
    if not np.any(oenv > 0):
        return np.zeros(0), 0.0
    tempo, frames = librosa.beat.beat_track(
        onset_envelope=oenv, sr=sr, hop_length=hop, start_bpm=start_bpm, tightness=tightness,
        trim=False, units="frames",
    )
    times = librosa.frames_to_time(frames, sr=sr, hop_length=hop)
    return np.asarray(times, dtype=np.float64), float(np.atleast_1d(tempo)[0])


def fit_tempo(beat_times: np.ndarray) -> float | None:
    """Tempo (BPM) = 60 / slope of beat time vs beat index, fitted by least squares.

    Indices come from the median inter-beat interval, so a beat the tracker skipped or
    doubled shifts the index instead of bending the fit. None with fewer than 3 beats."""
    t = np.asarray(beat_times, dtype=np.float64)
    if len(t) < 3:
        return None
    period = float(np.median(np.diff(t)))
    if period <= 0:
        return None
    idx = np.round((t - t[0]) / period)
    if len(np.unique(idx)) < 3:
        return None
    slope = np.polyfit(idx, t, 1)[0]
    return 60.0 / slope if slope > 0 else None


def onset_grid(oenv: np.ndarray, fps_in: float, n_out: int, fps_out: float = 25.0) -> np.ndarray:
    """Onset strength resampled to `fps_out` by taking the max over the input frames nearest
    each output frame (frame i <-> time i / fps_out), scaled to 0..1."""
    out = np.zeros(n_out, dtype=np.float32)
    if len(oenv) == 0:
        return out
    dest = np.round(np.arange(len(oenv)) / fps_in * fps_out).astype(np.int64)
    keep = dest < n_out
    np.maximum.at(out, dest[keep], oenv[keep].astype(np.float32))
    peak = out.max()
    return out / peak if peak > 0 else out


def beat_grid(beat_times: np.ndarray, n_out: int, fps_out: float = 25.0) -> np.ndarray:
    """1.0 at the `fps_out` frame nearest each beat (the last frame for a beat in the final
    half frame), 0 elsewhere."""
    out = np.zeros(n_out, dtype=np.float32)
    if n_out:
        idx = np.round(np.asarray(beat_times, dtype=np.float64) * fps_out).astype(np.int64)
        out[np.clip(idx, 0, n_out - 1)] = 1.0
    return out
