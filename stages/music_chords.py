"""Chords: frame chroma matched against 24 major/minor triad templates plus "no chord",
smoothed with a sticky-transition Viterbi pass, then merged into segments (Harte labels)."""
from __future__ import annotations

import librosa
import numpy as np

# Harte root spellings, sharps as in music_key.TONICS (mir_eval accepts sharps and flats).
ROOTS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
LABELS = [f"{r}:maj" for r in ROOTS] + [f"{r}:min" for r in ROOTS] + ["N"]
N_INDEX = 24


def triad_templates() -> np.ndarray:
    """[24, 12] unit-norm binary triads: rows 0-11 major on C..B, rows 12-23 minor."""
    rows = []
    for third in (4, 3):
        for root in range(12):
            t = np.zeros(12)
            t[[root, (root + third) % 12, (root + 7) % 12]] = 1.0
            rows.append(t / np.sqrt(3.0))
    return np.stack(rows)


_TEMPLATES = triad_templates()


def chord_posteriors(
    chroma: np.ndarray, voiced: np.ndarray, sharpness: float, no_chord_level: float
) -> np.ndarray:
    """[25, T] per-frame probabilities from energy chroma [12, T]. Each frame is scaled to its
    loudest pitch class and log-compressed (log1p(10 x)), so that weaker chord tones count.
    A frame's score for a triad is the cosine between that and the template (1.0 for a pure
    triad, 0.5 for flat chroma); "N" scores the fixed `no_chord_level`, and frames that are
    not `voiced` (too quiet) are N outright."""
    c = np.asarray(chroma, dtype=np.float64)
    c = np.log1p(10.0 * c / np.maximum(c.max(axis=0, keepdims=True), 1e-12))
    c = c / np.maximum(np.linalg.norm(c, axis=0, keepdims=True), 1e-9)
    scores = np.vstack([_TEMPLATES @ c, np.full((1, c.shape[1]), no_chord_level)])
    scores[:, ~voiced] = 0.0
    scores[N_INDEX, ~voiced] = 1.0
    z = sharpness * (scores - scores.max(axis=0, keepdims=True))
    p = np.exp(z)
    return p / p.sum(axis=0, keepdims=True)


def decode_chords(
    chroma: np.ndarray,
    voiced: np.ndarray,
    frame_seconds: float,
    clip_seconds: float,
    min_seconds: float,
    stay_prob: float,
    sharpness: float = 10.0,
    no_chord_level: float = 0.6,
) -> list[dict]:
    """Segments [{start, end, label}] covering [0, clip_seconds], none shorter than
    `min_seconds` unless the whole clip is. `chroma` [12, T] is energy chroma, one frame per
    `frame_seconds`, frame j centred on j * frame_seconds."""
    n = chroma.shape[1]
    if n == 0:
        return [{"start": 0.0, "end": float(clip_seconds), "label": "N"}]
    prob = chord_posteriors(chroma, voiced, sharpness, no_chord_level)
    trans = librosa.sequence.transition_loop(25, stay_prob)
    states = librosa.sequence.viterbi_discriminative(prob, trans)
    # Runs of equal states -> segments; frame j covers [j - 0.5, j + 0.5) * frame_seconds.
    change = np.flatnonzero(np.diff(states)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [n]])
    segs = []
    for s, e in zip(starts, ends):
        t0 = 0.0 if s == 0 else (s - 0.5) * frame_seconds
        t1 = clip_seconds if e == n else (e - 0.5) * frame_seconds
        segs.append([float(min(t0, clip_seconds)), float(min(t1, clip_seconds)), int(states[s])])
    segs = [g for g in segs if g[1] > g[0]]
    return [
        {"start": round(a, 3), "end": round(b, 3), "label": LABELS[k]}
        for a, b, k in _absorb_short(segs, min_seconds)
    ]


def _absorb_short(segs: list[list], min_seconds: float) -> list[list]:
    """Repeatedly hand the shortest too-short segment to its longer neighbour, merging equal
    neighbours, until every segment lasts at least `min_seconds` (or one is left)."""
    segs = [list(g) for g in segs]
    while len(segs) > 1:
        lengths = [b - a for a, b, _ in segs]
        i = int(np.argmin(lengths))
        if lengths[i] >= min_seconds:
            break
        if i == 0:
            j = 1
        elif i == len(segs) - 1:
            j = i - 1
        else:
            j = i - 1 if lengths[i - 1] >= lengths[i + 1] else i + 1
        lo, hi = min(i, j), max(i, j)
        segs[lo:hi + 1] = [[segs[lo][0], segs[hi][1], segs[j][2]]]
        merged = [segs[0]]
        for g in segs[1:]:
            if g[2] == merged[-1][2]:
                merged[-1][1] = g[1]
            else:
                merged.append(g)
        segs = merged
    return segs


def cadence_triads(chords: list[dict]) -> tuple[int | None, int | None]:
    """Template indices (0-23) of the first and last sounding chords, None where N."""
    sounding = [LABELS.index(c["label"]) for c in chords if c["label"] != "N"]
    return (sounding[0], sounding[-1]) if sounding else (None, None)


def triad_seconds(chords: list[dict]) -> np.ndarray:
    """[24] total seconds of each triad (major C..B, minor C..B) among the segments."""
    out = np.zeros(24)
    for c in chords:
        if c["label"] != "N":
            out[LABELS.index(c["label"])] += c["end"] - c["start"]
    return out
