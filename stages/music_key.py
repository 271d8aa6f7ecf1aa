"""Key: the clip's pitch-class distribution correlated with 24 rotated key profiles
(Krumhansl-Schmuckler), plus chord-function and first/last-chord evidence from the chords."""
from __future__ import annotations

import numpy as np

# Sharps throughout, as pipeline.synth spells them (mir_eval.key accepts either spelling;
# compare keys with mir_eval.key.weighted_score, not string equality, when flats may occur).
TONICS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]

# (major, minor) profiles indexed from the tonic; values as published (the same numbers
# music21.analysis.discrete uses).
PROFILES: dict[str, tuple[list[float], list[float]]] = {
    "krumhansl": (
        [6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88],
        [6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17],
    ),
    "temperley": (  # Temperley's Kostka-Payne corpus profile
        [0.748, 0.060, 0.488, 0.082, 0.670, 0.460, 0.096, 0.715, 0.104, 0.366, 0.057, 0.400],
        [0.712, 0.084, 0.474, 0.618, 0.049, 0.460, 0.105, 0.747, 0.404, 0.067, 0.133, 0.330],
    ),
    "aarden": (  # Aarden-Essen
        [17.7661, 0.145624, 14.9265, 0.160186, 19.8049, 11.3587, 0.291248, 22.062, 0.145624,
         8.15494, 0.232998, 4.95122],
        [18.2648, 0.737619, 14.0499, 16.8599, 0.702494, 14.4362, 0.702494, 18.6161, 4.56621,
         1.93186, 7.37619, 1.75623],
    ),
    "bellman": (  # Bellman-Budge
        [16.80, 0.86, 12.95, 1.41, 13.49, 11.93, 1.25, 20.28, 1.80, 8.04, 0.62, 10.57],
        [18.16, 0.69, 12.99, 13.34, 1.07, 11.15, 1.38, 21.07, 7.49, 1.53, 0.92, 10.21],
    ),
    "simple": (  # Sapp's simple weights
        [2, 0, 1, 0, 1, 1, 0, 2, 0, 1, 0, 1],
        [2, 0, 1, 1, 0, 1, 0, 2, 1, 0, 0.5, 0.5],
    ),
}


# How strongly each triad implies a key, by its root's distance from the tonic (semitones)
# and quality: tonic 1, dominant .8, subdominant .7, other diatonic triads less; chords
# foreign to the key 0. In minor the dominant is the (harmonic-minor) major V.
HARMONY = {
    "major": {(0, 0): 1.0, (7, 0): 0.8, (5, 0): 0.7, (9, 1): 0.5, (2, 1): 0.5, (4, 1): 0.3},
    "minor": {(0, 1): 1.0, (7, 0): 0.8, (5, 1): 0.7, (8, 0): 0.5, (3, 0): 0.5, (7, 1): 0.3,
              (10, 0): 0.3},
}


def harmony_matrix() -> np.ndarray:
    """[24 keys, 24 triads] weights from HARMONY; both indexed major C..B then minor C..B."""
    m = np.zeros((24, 24))
    for k in range(24):
        table = HARMONY["major" if k < 12 else "minor"]
        for t in range(24):
            m[k, t] = table.get(((t - k) % 12, t // 12), 0.0)
    return m


_HARMONY = harmony_matrix()


def key_matrix(profile: str) -> np.ndarray:
    """[24, 12] z-scored templates: rows 0-11 major keys on C..B, rows 12-23 minor keys."""
    major, minor = (np.asarray(p, dtype=np.float64) for p in PROFILES[profile])
    rows = [np.roll(major, k) for k in range(12)] + [np.roll(minor, k) for k in range(12)]
    m = np.stack(rows)
    m -= m.mean(axis=1, keepdims=True)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


# Pitch-class contrast (std / mean) of tonal music: >= 0.31 on every synthetic clip and every
# Bach chorale window of bench/music21_accuracy; white noise ~0.03, brown noise ~0.17.
CLARITY_REF = 0.3


def key_name(index: int) -> tuple[str, str]:
    return TONICS[index % 12], "major" if index < 12 else "minor"


def estimate_key(
    pitch_classes: np.ndarray,
    profile: str = "simple",
    triad_seconds: np.ndarray | None = None,
    harmony_weight: float = 0.0,
    cadence_triads: tuple[int | None, ...] = (),
    cadence_weight: float = 0.0,
    temperature: float = 0.1,
) -> dict:
    """Best of 24 keys by a score with three parts:
      * Pearson correlation of the clip's pitch-class distribution with the key's profile;
      * `harmony_weight` x the duration-weighted mean of HARMONY over the clip's triads
        (`triad_seconds`: [24] seconds per triad, as the chord decoder found them);
      * `cadence_weight` / len(cadence_triads) for each cadence triad (the first and the last
        chord, indices 0-23) that is the key's tonic triad. Where two keys share a scale (the
        loop Am-F-C-G is A minor or C major) this is the cue left: where the music sets out
        and comes to rest.

    `key_confidence` is the softmax weight of the winner over all 24 scores (temperature
    `temperature`), times the clip's tonal clarity: the contrast (std / mean) of its
    pitch-class distribution relative to CLARITY_REF, capped at 1. Correlation alone is blind
    to scale, so white noise would otherwise find a "key" with high confidence."""
    v = np.asarray(pitch_classes, dtype=np.float64)
    clarity = min(1.0, float(v.std() / v.mean()) / CLARITY_REF) if v.mean() > 0 else 0.0
    v = v - v.mean()
    norm = np.linalg.norm(v)
    if norm == 0 or not np.isfinite(norm):
        score = np.zeros(24)
    else:
        score = key_matrix(profile) @ (v / norm)
        if triad_seconds is not None and np.sum(triad_seconds) > 0:
            score += harmony_weight * (_HARMONY @ (triad_seconds / np.sum(triad_seconds)))
        for t in cadence_triads:
            if t is not None:
                score[t] += cadence_weight / len(cadence_triads)
    best = int(np.argmax(score))
    conf = clarity / float(np.exp((score - score[best]) / temperature).sum())
    tonic, mode = key_name(best)
    return {"key": f"{tonic} {mode}", "tonic": tonic, "mode": mode, "key_confidence": conf,
            "scores": score}
