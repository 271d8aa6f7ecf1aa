"""Synthetic music whose tempo, beats, key and chords are known exactly.

A small additive synthesiser: drums mark the quarter-note pulse, bass and pad spell the chords,
an arpeggio plays chord tones. Every event is placed on a sample computed from the truth times,
so the truth dict is the score, not an estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import butter, sosfilt

PITCH_CLASSES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
# Cadential loops (tonic and a major dominant in every cycle), so any 10 s window states its key;
# loops like i-VI-III-VII are the relative major's chords and leave a mid-song window ambiguous.
DEFAULT_PROGRESSIONS = {"major": ["I", "IV", "V", "I"], "minor": ["i", "iv", "V", "i"]}
_DEGREES = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}
INSTRUMENTS = ["kick drum", "snare drum", "hi-hat", "bass", "synth pad", "synth arpeggio"]


@dataclass
class MusicSpec:
    seconds: float = 20.0
    tempo_bpm: float = 120.0
    tonic: str = "A"
    mode: str = "minor"
    progression: list[str] | None = None
    beats_per_bar: int = 4
    beats_per_chord: int = 4
    sample_rate: int = 48000
    seed: int = 0
    silent: bool = False


@dataclass
class Chord:
    start: float
    end: float
    root: int            # pitch class 0-11
    quality: str         # "maj" | "min"
    numeral: str = field(default="")

    @property
    def label(self) -> str:
        return f"{PITCH_CLASSES[self.root]}:{self.quality}"

    @property
    def pitch_classes(self) -> list[int]:
        third = 4 if self.quality == "maj" else 3
        return [self.root, (self.root + third) % 12, (self.root + 7) % 12]


def parse_numeral(numeral: str, tonic_pc: int, mode: str) -> tuple[int, str]:
    """Roman numeral -> (root pitch class, quality). Case gives quality; 'b'/'#' prefix alters."""
    shift = 0
    body = numeral
    while body and body[0] in "b#":
        shift += -1 if body[0] == "b" else 1
        body = body[1:]
    degree = _DEGREES.get(body.lower())
    if degree is None or not (body.isupper() or body.islower()):
        raise ValueError(f"unsupported roman numeral {numeral!r} (only plain maj/min triads)")
    root = (tonic_pc + SCALES[mode][degree] + shift) % 12
    return root, "maj" if body.isupper() else "min"


def chord_timeline(spec: MusicSpec) -> list[Chord]:
    """Chords on exact beat boundaries; the last segment is forced to the tonic (cadence)."""
    if spec.mode not in SCALES:
        raise ValueError(f"mode must be major or minor, got {spec.mode!r}")
    tonic_pc = PITCH_CLASSES.index(spec.tonic)
    prog = list(spec.progression or DEFAULT_PROGRESSIONS[spec.mode])
    beat = 60.0 / spec.tempo_bpm
    span = spec.beats_per_chord * beat
    n = max(1, math.ceil(spec.seconds / span - 1e-9))
    chords = []
    for k in range(n):
        root, quality = parse_numeral(prog[k % len(prog)], tonic_pc, spec.mode)
        chords.append(Chord(k * span, min((k + 1) * span, spec.seconds), root, quality,
                            prog[k % len(prog)]))
    # A sliver shorter than a beat is not a chord anyone could hear: give it to its neighbour.
    if len(chords) > 1 and chords[-1].end - chords[-1].start < beat - 1e-9:
        last = chords.pop()
        chords[-1].end = last.end
    tonic_q = "maj" if spec.mode == "major" else "min"
    chords[-1].root, chords[-1].quality = tonic_pc, tonic_q
    chords[-1].numeral = "I" if spec.mode == "major" else "i"
    merged = [chords[0]]
    for c in chords[1:]:
        if c.label == merged[-1].label:
            merged[-1].end = c.end
        else:
            merged.append(c)
    return merged


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _add(buf: np.ndarray, start: int, sig: np.ndarray, gains: tuple[float, float]) -> None:
    end = min(buf.shape[1], start + len(sig))
    if end > start:
        buf[0, start:end] += gains[0] * sig[: end - start]
        buf[1, start:end] += gains[1] * sig[: end - start]


def _pan(p: float) -> tuple[float, float]:
    """Constant-power pan, p in [-1 (left), 1 (right)]."""
    a = (p + 1) * math.pi / 4
    return math.cos(a), math.sin(a)


_TABLE = 4096


def _tone(freq: float, dur: float, sr: int, partials: list[float]) -> np.ndarray:
    """Harmonic tone read from a one-period wavetable: one lookup per sample whatever the number
    of partials (a 60 s render stays well under a second)."""
    ks = [k for k in range(1, len(partials) + 1) if freq * k < sr / 2 * 0.9]  # below Nyquist
    phase = np.arange(_TABLE) * (2 * np.pi / _TABLE)
    table = sum(partials[k - 1] * np.sin(k * phase) for k in ks)
    idx = (np.arange(int(dur * sr)) * (freq * _TABLE / sr)).astype(np.int64) % _TABLE
    return table[idx]


class _Drums:
    """Pre-rendered one-shots; noise comes from the seeded generator so output is reproducible."""

    def __init__(self, sr: int, rng: np.random.Generator):
        nyq = sr / 2
        t = np.arange(int(0.3 * sr)) / sr
        f = 48 + 110 * np.exp(-t * 30)
        self.kick = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t * 11)
        self.kick[: int(0.004 * sr)] += rng.standard_normal(int(0.004 * sr)) * 0.3
        t = np.arange(int(0.2 * sr)) / sr
        band = butter(2, [min(1000, nyq * 0.4), min(6000, nyq * 0.9)], "bandpass", fs=sr,
                      output="sos")
        noise = sosfilt(band, rng.standard_normal(len(t)))
        self.snare = (noise / np.abs(noise).max() * np.exp(-t * 22)
                      + 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t * 35))
        t = np.arange(int(0.05 * sr)) / sr
        high = butter(4, min(7000, nyq * 0.6), "highpass", fs=sr, output="sos")
        noise = sosfilt(high, rng.standard_normal(len(t)))
        self.hat = noise / np.abs(noise).max() * np.exp(-t * 90)


def _envelope(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    env = np.ones(n)
    a, r = min(n, int(attack * sr)), min(n, int(release * sr))
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    if r:
        env[n - r:] *= np.linspace(1, 0, r)
    return env


def render_music(spec: MusicSpec) -> tuple[np.ndarray, dict]:
    """Render `spec` to float32 [2, n] in [-1, 1] and return it with its exact truth dict."""
    sr = spec.sample_rate
    rng = np.random.default_rng(spec.seed)
    n = int(round(spec.seconds * sr))
    beat = 60.0 / spec.tempo_bpm
    n_beats = math.ceil(spec.seconds / beat - 1e-9)
    beat_times = [k * beat for k in range(n_beats)]
    chords = chord_timeline(spec)
    truth = {
        "tempo_bpm": float(spec.tempo_bpm),
        "beat_times": beat_times,
        "downbeat_times": beat_times[:: spec.beats_per_bar],
        "key": f"{spec.tonic} {spec.mode}",
        "tonic": spec.tonic,
        "mode": spec.mode,
        "progression": list(spec.progression or DEFAULT_PROGRESSIONS[spec.mode]),
        "chords": [{"start": c.start, "end": c.end, "label": c.label} for c in chords],
        "instruments": list(INSTRUMENTS),
        "sample_rate": sr,
        "seconds": float(spec.seconds),
    }
    buf = np.zeros((2, n))
    # Timbre and arpeggio shape vary with the seed; the score above does not.
    arp_pattern = [[0, 1, 2, 1], [0, 1, 2, 3], [0, 2, 1, 2], [3, 2, 1, 0]][rng.integers(4)]
    pad_rolloff = rng.uniform(1.2, 2.0)
    pad_partials = [1 / k ** pad_rolloff for k in range(1, 7)]
    drums = _Drums(sr, rng)

    def at(t: float) -> int:
        return int(round(t * sr))

    for k, bt in enumerate(beat_times):
        in_bar = k % spec.beats_per_bar
        accent = 1.0 if in_bar == 0 else 0.85
        if in_bar % 2 == 0:
            _add(buf, at(bt), drums.kick, (0.9 * accent,) * 2)
        else:
            _add(buf, at(bt), drums.snare, (0.4, 0.4))
        # Off-beat hats are quieter than on-beat ones: the eighth level must not win.
        _add(buf, at(bt), drums.hat, tuple(0.10 * g for g in _pan(0.5)))
        _add(buf, at(bt + beat / 2), drums.hat, tuple(0.06 * g for g in _pan(0.5)))

    for c in chords:
        dur = c.end - c.start
        # Pad: close-voiced triad around middle C, sustained for the whole chord.
        for pc in c.pitch_classes:
            midi = 60 + pc
            note = _tone(_hz(midi), dur, sr, pad_partials)
            note *= _envelope(len(note), sr, 0.12, 0.15)
            _add(buf, at(c.start), note, (0.16, 0.14))
        tones = [72 + pc for pc in c.pitch_classes] + [84 + c.root]
        first = math.ceil(c.start / beat - 1e-9)
        for j, k in enumerate(range(first, n_beats)):
            bt = k * beat
            if bt >= c.end - 1e-9:
                break
            t = np.arange(int(0.9 * beat * sr)) / sr
            bass = _tone(_hz(36 + c.root), 0.9 * beat, sr, [1, 0.5, 0.33, 0.25, 0.2])
            bass *= np.exp(-t * 3) * _envelope(len(t), sr, 0.005, 0.03)
            _add(buf, at(bt), bass, (0.35, 0.35))
            arp = _tone(_hz(tones[arp_pattern[j % 4]]), 0.8 * beat, sr, [1, 0.4, 0.2, 0.1])
            arp *= np.exp(-np.arange(len(arp)) / sr * 6) * _envelope(len(arp), sr, 0.003, 0.02)
            _add(buf, at(bt), arp, tuple(0.22 * g for g in _pan(-0.4)))

    if spec.silent:
        return np.zeros((2, n), np.float32), truth
    peak = np.abs(buf).max()
    audio = (buf * (0.8 / peak if peak > 0 else 1.0)).astype(np.float32)
    return audio, truth
