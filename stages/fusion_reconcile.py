"""Reconcile what the LLM (and, through it, the audio captions) says about key, tempo and chords
with what music_dsp measured. Pure functions.

Rules (DESIGN.md §5: measurements are computed, models refine and phrase them, disagreements are
recorded, not hidden):
- tempo: agrees when within `tolerance_pct` of the measured tempo, or of its double or half (octave
  errors are the usual ambiguity, not a disagreement). The stored tempo is always the measured one.
- key: same tonic pitch class (enharmonics agree: Db = C#) and same mode. Relative (A minor vs C
  major) and parallel (C minor vs C major) keys are disagreements, recorded with that note. The
  stored key is the measured one, in its spelling.
- chords: reduced to (root pitch class, major/minor); agree when every chord the model names occurs
  among the measured chords. Agreeing: the model's symbols are kept (they may carry sevenths);
  otherwise the measured progression.
Each disagreement: {field, measured, model, resolution: "measured", source: "answer"|"caption", note}.
Without a measurement, the model's value is kept and its source says "model"."""
from __future__ import annotations

import re
from typing import Any

PITCH = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
MAX_CHORDS = 16
_CHORD = re.compile(r"^([A-G])([#b]?)(.*)$")
_MINOR = re.compile(r"^(m(?!aj)|min|dim)")  # m7, m, min, dim: a minor third; maj7 is major


def pitch_class(name: str) -> int | None:
    """'C#' -> 1, 'Db' -> 1, 'B' -> 11; None for anything else."""
    m = re.match(r"^([A-G])([#b]?)$", (name or "").strip())
    if not m:
        return None
    return (PITCH[m.group(1)] + {"#": 1, "b": -1, "": 0}[m.group(2)]) % 12


def parse_key(key: str | None) -> tuple[int, str] | None:
    """'A minor' -> (9, 'minor')."""
    parts = (key or "").split()
    if len(parts) != 2 or parts[1] not in ("major", "minor"):
        return None
    pc = pitch_class(parts[0])
    return None if pc is None else (pc, parts[1])


def key_relation(measured: tuple[int, str], model: tuple[int, str]) -> str:
    """same | relative | parallel | other."""
    (mpc, mmode), (lpc, lmode) = measured, model
    if mpc == lpc and mmode == lmode:
        return "same"
    if mpc == lpc:
        return "parallel"
    if mmode != lmode and (lpc - mpc) % 12 == (9 if mmode == "major" else 3):
        return "relative"
    return "other"


def tempo_relation(measured: float, model: float, tolerance_pct: float) -> str | None:
    """same | double | half when `model` is within tolerance of measured x 1, 2 or 1/2; else None."""
    if not measured or not model or measured <= 0 or model <= 0:
        return None
    for name, factor in (("same", 1.0), ("double", 2.0), ("half", 0.5)):
        if abs(model / (measured * factor) - 1.0) * 100.0 <= tolerance_pct + 1e-9:
            return name
    return None


def chord_triad(symbol: str) -> tuple[int, str] | None:
    """'Am7' -> (9, 'min'), 'Bbmaj7' -> (10, 'maj'), 'A:min' (Harte) -> (9, 'min'), 'N' -> None."""
    symbol = (symbol or "").strip()
    if ":" in symbol:  # Harte, as music_dsp writes them
        root, _, quality = symbol.partition(":")
        pc = pitch_class(root)
        return None if pc is None else (pc, "min" if quality.startswith("min") else "maj")
    m = _CHORD.match(symbol.split("/")[0])
    if not m:
        return None
    pc = pitch_class(m.group(1) + m.group(2))
    return None if pc is None else (pc, "min" if _MINOR.match(m.group(3)) else "maj")


def measured_progression(chords: list[dict], limit: int = MAX_CHORDS) -> list[str]:
    """music_dsp's chord segments as symbols ('Am', 'C'), repeats merged, 'N' left out."""
    names: list[str] = []
    for chord in chords or []:
        label = chord.get("label", "N")
        if label == "N":
            continue
        root, _, quality = label.partition(":")
        name = root + ("m" if quality.startswith("min") else "")
        if not names or names[-1] != name:
            names.append(name)
    return names[:limit]


def chords_agree(measured: list[str], model: list[str]) -> bool:
    """Every chord the model names (as a triad) occurs among the measured ones."""
    have = {chord_triad(c) for c in measured} - {None}
    said = [chord_triad(c) for c in model]
    if any(t is None for t in said):
        return False
    return set(said) <= have


def _record(field: str, measured: Any, model: Any, source: str, note: str) -> dict:
    return {"field": field, "measured": measured, "model": model, "resolution": "measured",
            "source": source, "note": note}


def compare(music: dict, *, key: str | None = None, mode: str | None = None, tempo_bpm: float | None = None,
            chords: list[str] | None = None, tolerance_pct: float, source: str) -> list[dict]:
    """Disagreements between one set of claims (any may be None: no claim) and the measurements."""
    out: list[dict] = []
    measured_key = parse_key(music.get("key"))
    if key is not None and measured_key and (claimed := parse_key(key)):
        relation = key_relation(measured_key, claimed)
        if relation != "same":
            out.append(_record("key", music["key"], key, source, f"{relation} key"))
    elif key is None and mode is not None and music.get("mode") and mode != music["mode"]:
        out.append(_record("mode", music["mode"], mode, source, "mode differs"))
    measured_tempo = music.get("tempo_bpm")
    if tempo_bpm is not None and measured_tempo:
        if tempo_relation(float(measured_tempo), float(tempo_bpm), tolerance_pct) is None:
            pct = 100.0 * (float(tempo_bpm) / float(measured_tempo) - 1.0)
            out.append(_record("tempo_bpm", measured_tempo, tempo_bpm, source,
                               f"{pct:+.1f}% from measured (tolerance {tolerance_pct}%, octave errors allowed)"))
    if chords and music.get("chords") is not None:
        progression = measured_progression(music.get("chords", []))
        if not chords_agree(progression, chords):
            out.append(_record("chord_progression", progression, list(chords), source,
                               "chords not among the measured ones"))
    return out


def reconcile(answer: dict, music: dict, tolerance_pct: float) -> tuple[dict, list[dict], dict]:
    """(stored attributes, disagreements, sources) from a validated FusionAnswer dump and
    meta["music"]. `sources[field]` is measured | agreed | model."""
    attrs = dict(answer["attributes"])
    claims = answer.get("caption_claims") or {}
    model_key = f"{attrs['tonic']} {attrs['mode']}"
    disagreements = compare(music, key=model_key, tempo_bpm=attrs["tempo_bpm"], chords=attrs["chord_progression"],
                            tolerance_pct=tolerance_pct, source="answer")
    disputed = {d["field"] for d in disagreements}
    sources = {f: "model" for f in attrs}

    if parse_key(music.get("key")):
        attrs["key"], attrs["tonic"], attrs["mode"] = music["key"], music.get("tonic") or music["key"].split()[0], music["key"].split()[1]
        sources.update(key="measured" if "key" in disputed else "agreed")
    else:
        attrs["key"] = model_key
        sources["key"] = "model"
    sources["tonic"] = sources["mode"] = sources["key"]

    if music.get("tempo_bpm"):
        attrs["tempo_bpm"] = float(music["tempo_bpm"])
        sources["tempo_bpm"] = "measured" if "tempo_bpm" in disputed else "agreed"

    if music.get("chords") is not None:
        progression = measured_progression(music.get("chords", []))
        if "chord_progression" in disputed or not attrs["chord_progression"]:
            attrs["chord_progression"] = progression
            sources["chord_progression"] = "measured"
        else:
            sources["chord_progression"] = "agreed"

    if claims:
        claim_key = f"{claims['tonic']} {claims['mode']}" if claims.get("tonic") and claims.get("mode") else None
        disagreements += compare(music, key=claim_key, mode=claims.get("mode") if not claim_key else None,
                                 tempo_bpm=claims.get("tempo_bpm"), chords=claims.get("chords") or None,
                                 tolerance_pct=tolerance_pct, source="caption")
    order = ["key", "tonic", "mode", "tempo_bpm", "time_signature", "chord_progression", "genres", "moods",
             "emotion", "instruments", "energy", "vocals_present"]
    attrs = {k: attrs[k] for k in order if k in attrs}
    return attrs, disagreements, {k: sources.get(k, "model") for k in attrs}
