"""Accuracy of the music_dsp analysis against ground truth, and its speed.

Sets, scored the same way (`score_clip`):
  * music21: Bach chorales from music21's corpus, given a known tempo (MetronomeMark), written
    to MIDI, rendered with fluidsynth + the FluidR3 GM soundfont, cut into 10 s windows;
  * synthetic: `pipeline.synth.music` clips (SYNTH_SPECS, the same set tests/test_music_dsp.py
    asserts on), each a whole 10 s song;
  * synthetic_mid_song: the same songs rendered 24 s long and cut at 3.5, 7 and 14 s.

Ground truth for the chorales (see `score_truth`):
  tempo   the MetronomeMark we insert (quarter note = BPM); fermatas are not rendered.
  beats   the quarter-note grid of the score, anchored on the first full bar's downbeat
          (pickups handled); only 4/4 and 3/4 chorales are used, so the beat is the quarter.
  key     music21 `score.analyze('key')` (Aarden-Essen profile over the whole score), kept only
          when the final bass note is that key's tonic (a piece that cadences on its key); a
          window is also scored against the key music21 finds in the window's own notes.
  chords  `score.chordify()`: per beat, the slice covering most of the beat, labelled from
          music21's root and triad quality (maj/min/dim/aug; sevenths keep their triad,
          e.g. G7 -> G:maj). mir_eval's majmin ignores the dim/aug/unknown references.

Run: .venv/bin/python -m bench.music21_accuracy   (needs `fluidsynth` and FluidR3_GM.sf2)
Writes bench/results/music21_accuracy.{json,md}; renders are cached under bench/work/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import librosa
import mir_eval
import numpy as np
from scipy.signal import resample_poly

from pipeline.config import MusicDSPConfig
from stages.music_dsp import SR, analyze_clip

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "music21"
RESULTS = ROOT / "results"
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y fluidsynth fluid-soundfont-gm"
CLIP = 10.0
TEMPOS = [72, 84, 96, 108, 120, 132, 78, 90, 102, 114, 126]  # cycled over the chorales
OCTAVE_FACTORS = (1 / 3, 1 / 2, 1.0, 2.0, 3.0)
TEMPO_TOLERANCE = 0.02

# The synthetic set: tempos 80-150, tonics all round the circle, both modes, several
# progressions (the default minor loop i-VI-III-VII is the relative-major trap).
SYNTH_SPECS = [
    dict(tempo_bpm=80, tonic="A", mode="minor"),
    dict(tempo_bpm=86, tonic="D", mode="major"),
    dict(tempo_bpm=92, tonic="F#", mode="minor", progression=["i", "iv", "V", "i"]),
    dict(tempo_bpm=97, tonic="A#", mode="major", progression=["I", "IV", "V", "I"]),
    dict(tempo_bpm=104, tonic="C", mode="minor"),
    dict(tempo_bpm=110, tonic="E", mode="major"),
    dict(tempo_bpm=116, tonic="G", mode="minor", progression=["i", "VI", "iv", "V"]),
    dict(tempo_bpm=122, tonic="C#", mode="major", progression=["I", "vi", "ii", "V"]),
    dict(tempo_bpm=128, tonic="B", mode="minor"),
    dict(tempo_bpm=135, tonic="F", mode="major"),
    dict(tempo_bpm=142, tonic="D#", mode="minor", beats_per_chord=2),
    dict(tempo_bpm=150, tonic="G#", mode="major", beats_per_chord=2),
]


# ---------------------------------------------------------------- scoring (both sets)

def to_mono16(audio: np.ndarray, sr: int) -> np.ndarray:
    """[channels, n] or [n] at `sr` -> float32 mono at 16 kHz."""
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    if sr != SR:
        g = np.gcd(int(sr), SR)
        mono = resample_poly(mono, SR // g, int(sr) // g)
    return mono.astype(np.float32)


def window_truth(truth: dict, start: float, clip: float = CLIP) -> dict:
    """Truth of [start, start + clip) with times relative to the window start."""
    beats = [t - start for t in truth["beat_times"] if start - 1e-6 <= t < start + clip]
    chords = sorted((dict(c) for c in truth["chords"]), key=lambda c: c["start"])
    for a, b in zip(chords, chords[1:]):  # tolerate overlapping truth segments
        a["end"] = min(a["end"], b["start"])
    win = []
    for c in chords:
        s, e = max(c["start"], start) - start, min(c["end"], start + clip) - start
        if e - s > 1e-6:
            win.append({"start": s, "end": e, "label": c["label"]})
    return {**truth, "beat_times": beats, "chords": win}


def chord_majmin(ref: list[dict], est: list[dict]) -> float | None:
    """mir_eval majmin weighted overlap of `est` against `ref` over the reference span."""
    if not ref:
        return None
    ri = np.array([[c["start"], c["end"]] for c in ref])
    rl = [c["label"] for c in ref]
    ei = np.array([[c["start"], c["end"]] for c in est])
    el = [c["label"] for c in est]
    ei, el = mir_eval.util.adjust_intervals(ei, el, ri.min(), ri.max(), "N", "N")
    ri, rl = mir_eval.util.adjust_intervals(ri, rl, ri.min(), ri.max(), "N", "N")
    intervals, rl, el = mir_eval.util.merge_labeled_intervals(ri, rl, ei, el)
    durations = mir_eval.util.intervals_to_durations(intervals)
    comparisons = mir_eval.chord.majmin(rl, el)
    if np.sum(durations[comparisons >= 0]) <= 0:
        return None  # no maj/min reference chord in this window
    return float(mir_eval.chord.weighted_accuracy(comparisons, durations))


def score_clip(music: dict, truth: dict) -> dict:
    """Per-clip metrics. Beat F-measure (70 ms) both over the whole clip and as mir_eval
    scores by default (beats before 5 s trimmed from both sides)."""
    tempo, ref_tempo = music["tempo_bpm"], float(truth["tempo_bpm"])
    rel = abs(tempo - ref_tempo) / ref_tempo if tempo else 1.0
    octave = min(abs(tempo * f - ref_tempo) / ref_tempo for f in OCTAVE_FACTORS) if tempo else 1.0
    ref_b = np.asarray(truth["beat_times"], dtype=float)
    est_b = np.asarray(music["beat_times"], dtype=float)
    out = {
        "tempo_rel_error": rel,
        "tempo_ok": rel <= TEMPO_TOLERANCE,
        "tempo_octave_ok": octave <= TEMPO_TOLERANCE,
        "beat_f": float(mir_eval.beat.f_measure(ref_b, est_b)),
        "beat_f_trim5": float(mir_eval.beat.f_measure(
            mir_eval.beat.trim_beats(ref_b), mir_eval.beat.trim_beats(est_b))),
        "key_weighted": float(mir_eval.key.weighted_score(truth["key"], music["key"])),
        "chord_majmin": chord_majmin(truth["chords"], music["chords"]),
    }
    out["key_exact"] = out["key_weighted"] == 1.0
    if truth.get("window_key"):
        out["key_weighted_local"] = float(mir_eval.key.weighted_score(truth["window_key"], music["key"]))
    return out


def summarise(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r if isinstance(r[k], (bool, float, int))})
    out = {"n_clips": len(rows)}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        if vals:
            out[k] = {"mean": round(float(np.mean(vals)), 4), "median": round(float(np.median(vals)), 4),
                      "n": len(vals)}
    return out


# ---------------------------------------------------------------- synthetic set

def synthetic_clips(seconds: float = CLIP) -> list[tuple[str, np.ndarray, dict]]:
    from pipeline.synth import MusicSpec, render_music

    clips = []
    for i, spec in enumerate(SYNTH_SPECS):
        audio, truth = render_music(MusicSpec(seconds=seconds, seed=i, **spec))
        y = to_mono16(audio, truth["sample_rate"])[: int(seconds * SR)]
        clips.append((f"synth{i:02d}_{spec['tempo_bpm']}_{spec['tonic']}_{spec['mode']}", y,
                      window_truth(truth, 0.0, seconds)))
    return clips


def synthetic_mid_song_clips(offsets=(3.5, 7.0, 14.0), seconds: float = 24.0) -> list[tuple[str, np.ndarray, dict]]:
    """The same specs rendered 24 s long and cut at `offsets`: windows that neither start on
    the first chord nor end on the closing tonic, as clips cut from a video usually do."""
    from pipeline.synth import MusicSpec, render_music

    clips = []
    for i, spec in enumerate(SYNTH_SPECS):
        audio, truth = render_music(MusicSpec(seconds=seconds, seed=i, **spec))
        y = to_mono16(audio, truth["sample_rate"])
        for off in offsets:
            clips.append((f"synth{i:02d}+{off:g}s", y[int(off * SR): int((off + CLIP) * SR)],
                          window_truth(truth, off)))
    return clips


# ---------------------------------------------------------------- music21 set

def check_tools() -> None:
    missing = [what for what, ok in [("fluidsynth", shutil.which("fluidsynth")),
                                     (str(SOUNDFONT), SOUNDFONT.exists())] if not ok]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}; install with:\n  {INSTALL_HINT}")


def _key_name(k) -> str:
    """music21 Key -> mir_eval key string ('B-' -> 'Bb')."""
    return f"{k.tonic.name.replace('-', 'b')} {k.mode}"


def select_chorales(n: int) -> list[Path]:
    """Every k-th four-part chorale in 4/4 or 3/4, for a spread of keys."""
    from music21 import corpus

    paths = sorted(p for p in corpus.getComposer("bach") if p.suffix == ".mxl" and "." in p.stem)
    step = max(1, len(paths) // (3 * n))
    return paths[::step]


def score_truth(score, bpm: float) -> dict | None:
    """Ground truth of a score played at `bpm` quarters per minute (None: unusable score)."""
    from music21 import meter

    sigs = {(t.numerator, t.denominator) for t in score.recurse().getElementsByClass(meter.TimeSignature)}
    if len(score.parts) != 4 or not sigs or not sigs <= {(4, 4), (3, 4)} or len(sigs) != 1:
        return None
    key = score.analyze("key")
    bass = score.parts[-1].flatten().notes
    if not len(bass) or bass[-1].pitches[0].pitchClass != key.tonic.pitchClass:
        return None
    spq = 60.0 / bpm
    end_q = float(score.highestTime)
    measures = list(score.parts[0].getElementsByClass("Measure"))
    bar = float(measures[1].duration.quarterLength) if len(measures) > 1 else 4.0
    first_full = next((m for m in measures if float(m.duration.quarterLength) >= bar
                       and not m.paddingLeft), measures[0])
    anchor = float(first_full.offset) % 1.0
    beats_q = np.arange(anchor, end_q - 1e-6, 1.0)
    slices = [(float(c.offset), float(c.offset + c.quarterLength), c)
              for c in score.chordify().flatten().getElementsByClass("Chord")]
    chords = []
    for b in beats_q:
        e = min(b + 1.0, end_q)
        best = max(slices, key=lambda s: min(s[1], e) - max(s[0], b), default=None)
        label = "N"
        if best is not None and min(best[1], e) - max(best[0], b) > 0:
            label = _chord_label(best[2])
        if chords and chords[-1]["label"] == label and abs(chords[-1]["end"] - b * spq) < 1e-6:
            chords[-1]["end"] = e * spq
        else:
            chords.append({"start": b * spq, "end": e * spq, "label": label})
    return {"tempo_bpm": float(bpm), "beat_times": [float(b * spq) for b in beats_q],
            "key": _key_name(key), "chords": chords, "seconds": end_q * spq}


def _chord_label(chord) -> str:
    quality = {"major": "maj", "minor": "min", "diminished": "dim", "augmented": "aug"}
    try:
        root, q = chord.root(), chord.quality
    except Exception:  # music21 cannot name it
        return "X"
    if q not in quality:
        return "X"
    return f"{root.name.replace('-', 'b')}:{quality[q]}"


def window_key(score, bpm: float, start: float) -> str:
    from music21 import stream

    q0, q1 = start * bpm / 60.0, (start + CLIP) * bpm / 60.0
    notes = score.flatten().notes.getElementsByOffset(q0, q1, includeEndBoundary=False,
                                                       mustBeginInSpan=False)
    s = stream.Stream()
    for n in notes:
        s.append(n)
    return _key_name(s.analyze("key")) if len(s) else ""


def render_chorale(path: Path, bpm: float) -> tuple[np.ndarray, dict] | None:
    """16 kHz mono audio and truth of one chorale at `bpm`, cached under bench/work/."""
    from music21 import corpus, instrument, tempo

    stem = f"{path.stem}_{bpm}"
    wav, meta = WORK / f"{stem}.wav", WORK / f"{stem}.json"
    if wav.exists() and meta.exists():
        truth = json.loads(meta.read_text())
        if truth is None:
            return None
        import soundfile as sf
        y, sr = sf.read(wav, dtype="float32", always_2d=True)
        return to_mono16(y.T, sr), truth
    WORK.mkdir(parents=True, exist_ok=True)
    score = corpus.parse(path)
    truth = score_truth(score, bpm)
    if truth is None:
        meta.write_text("null")
        return None
    for mark in list(score.recurse().getElementsByClass(tempo.MetronomeMark)):
        mark.activeSite.remove(mark)
    for part in score.parts:  # every voice on the GM piano
        for inst in list(part.recurse().getElementsByClass(instrument.Instrument)):
            inst.activeSite.remove(inst)
        part.insert(0, instrument.Piano())
    score.parts[0].getElementsByClass("Measure")[0].insert(0, tempo.MetronomeMark(number=bpm))
    truth["window_keys"] = {str(s): window_key(score, bpm, s) for s in (0.0, 10.0, 20.0, 30.0)}
    mid = WORK / f"{stem}.mid"
    score.write("midi", fp=str(mid))
    subprocess.run(["fluidsynth", "-ni", "-q", "-F", str(wav), "-r", str(SR), "-g", "0.6",
                    str(SOUNDFONT), str(mid)], check=True, capture_output=True)
    meta.write_text(json.dumps(truth))
    return render_chorale(path, bpm)


def music21_clips(n_pieces: int, windows: int) -> list[tuple[str, np.ndarray, dict]]:
    clips, used = [], 0
    for path in select_chorales(n_pieces):
        if used >= n_pieces:
            break
        bpm = TEMPOS[used % len(TEMPOS)]
        got = render_chorale(path, bpm)
        if got is None:
            continue
        used += 1
        y, truth = got
        for w in range(windows):
            start = w * CLIP
            if start + CLIP > truth["seconds"]:
                break
            win = window_truth(truth, start)
            win["window_key"] = truth["window_keys"].get(str(start), "")
            clip = y[int(start * SR): int((start + CLIP) * SR)]
            clips.append((f"{path.stem}@{bpm}bpm+{start:.0f}s", clip, win))
    return clips


# ---------------------------------------------------------------- speed

def measure_speed(clips: list[np.ndarray], cfg: MusicDSPConfig, repeats: int = 3) -> dict:
    """x real time of analyze_clip pinned to one core, against one librosa STFT pass of the
    same clips. Each figure is the fastest of `repeats` passes (as timeit does), so that other
    load on a shared machine inflates it less."""

    def fastest(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for y in clips:
                fn(y)
            best = min(best, (time.perf_counter() - t0) / len(clips))
        return best

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        analyze_clip(clips[0], cfg, CLIP)
        dsp = fastest(lambda y: analyze_clip(y, cfg, CLIP))
        stft = fastest(lambda y: np.abs(librosa.stft(y, n_fft=2048, hop_length=512)))
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
    return {"seconds_per_clip": round(dsp, 4), "x_real_time_one_core": round(CLIP / dsp, 1),
            "baseline_stft_seconds_per_clip": round(stft, 4),
            "cost_vs_one_stft_pass": round(dsp / stft, 1), "pinned_to_one_core": bool(affinity),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ---------------------------------------------------------------- report

HEADLINES = [
    ("tempo within 2 %", "tempo_ok"),
    ("tempo within 2 %, octave-corrected (x1/3, 1/2, 2, 3)", "tempo_octave_ok"),
    ("beat F-measure (70 ms, whole clip)", "beat_f"),
    ("beat F-measure (mir_eval default: beats < 5 s trimmed)", "beat_f_trim5"),
    ("key weighted score (mir_eval)", "key_weighted"),
    ("key exact", "key_exact"),
    ("key weighted score vs the window's own music21 key", "key_weighted_local"),
    ("chords majmin weighted overlap", "chord_majmin"),
]


def evaluate(clips: list[tuple[str, np.ndarray, dict]], cfg: MusicDSPConfig) -> tuple[dict, list[dict]]:
    rows = []
    for name, y, truth in clips:
        music = analyze_clip(y, cfg, CLIP).music
        rows.append({"clip": name, "truth_key": truth["key"], "est_key": music["key"],
                     "key_confidence": music["key_confidence"],
                     "truth_tempo": truth["tempo_bpm"], "est_tempo": music["tempo_bpm"],
                     **score_clip(music, truth)})
    return summarise(rows), rows


SET_TITLES = {"music21": "Bach chorales", "synthetic": "synthetic", "synthetic_mid_song": "synthetic, mid-song"}


def markdown(result: dict) -> str:
    sets = result["sets"]
    names = list(SET_TITLES)
    lines = [
        "# music_dsp accuracy against ground truth",
        "",
        f"Generated by `python -m bench.music21_accuracy` on {result['machine']}.",
        f"Bach chorales: {sets['music21']['n_clips']} windows of {CLIP:.0f} s (from 0, 10, 20 s) of "
        f"{result['music21_pieces']} chorales from music21's corpus at {min(TEMPOS)}-{max(TEMPOS)} BPM, "
        "rendered with fluidsynth (GM piano). Synthetic: the 12 clips tests/test_music_dsp.py asserts on "
        "(whole 10 s songs, first chord to closing tonic); mid-song: the same songs rendered 24 s and cut "
        "at 3.5, 7 and 14 s. Cells are mean (median); truth definitions are in the module docstring.",
        "",
        "| metric | " + " | ".join(SET_TITLES[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, k in HEADLINES:
        cells = []
        for n in names:
            v = sets[n].get(k)
            cells.append(f"{v['mean']:.3f} ({v['median']:.3f})" if v else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    conf = result["key_confidence"]
    sp = result["speed"]
    lines += [
        "",
        f"Key confidence (all sets): mean {conf['when_exact']:.2f} when the key is exact, "
        f"{conf['when_wrong']:.2f} when it is not.",
        "",
        f"Speed (one core, {sp['n_clips']} clips, fastest of 3 passes, load average "
        f"{sp['load_average_1min']}): {sp['seconds_per_clip'] * 1000:.0f} ms per 10 s clip = "
        f"**{sp['x_real_time_one_core']:.0f}x real time**; that is {sp['cost_vs_one_stft_pass']:.1f}x the cost "
        "of one plain librosa STFT pass (n_fft 2048, hop 512) of the same clip (the baseline, same run).",
        "",
        f"Method: {result['method']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pieces", type=int, default=30, help="chorales to render")
    ap.add_argument("--windows", type=int, default=3, help="10 s windows per chorale (from 0 s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    check_tools()
    cfg = MusicDSPConfig()
    t0 = time.time()
    m21 = music21_clips(args.pieces, args.windows)
    synth = synthetic_clips()
    print(f"prepared {len(m21)} music21 windows and {len(synth)} synthetic clips in {time.time() - t0:.0f} s")
    analyze_clip(synth[0][1], cfg, CLIP)  # JIT warm-up outside the timings
    mid = synthetic_mid_song_clips()
    summaries, rows = {}, {}
    for name, clips in (("music21", m21), ("synthetic", synth), ("synthetic_mid_song", mid)):
        summaries[name], rows[name] = evaluate(clips, cfg)
    every = [r for rs in rows.values() for r in rs]
    speed = measure_speed([y for _, y, _ in m21[:20] + synth], cfg)
    speed["n_clips"] = len(m21[:20] + synth)
    result = {
        "machine": f"{platform.node() or 'host'} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs), Python {platform.python_version()}, librosa {librosa.__version__}",
        "config": cfg.model_dump(),
        "method": analyze_clip(synth[0][1], cfg, CLIP).music["provenance"]["method"],
        "music21_pieces": len({r["clip"].split("@")[0] for r in rows["music21"]}),
        "sets": summaries,
        "key_confidence": {
            "when_exact": round(float(np.mean([r["key_confidence"] for r in every if r["key_exact"]])), 3),
            "when_wrong": round(float(np.mean([r["key_confidence"] for r in every if not r["key_exact"]] or [0])), 3),
        },
        "speed": speed,
        "clips": rows,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "music21_accuracy.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = markdown(result)
    (args.out / "music21_accuracy.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
