"""The answer prompt_fusion asks Qwen3 for: normalised musical attributes, what the captions claimed,
and text prompts at fixed control levels, as pydantic models with length caps.

The same models give the JSON schema sent as vLLM structured output (`json_schema()`: flat, no
`$ref`, every property required, no extra properties) and validate every answer on the way back, so
whatever is stored is schema-checked and length-capped. Change a field, a cap or an enum here: bump
FUSION_SCHEMA_VERSION (it is part of the answer cache key and of each clip's provenance)."""
from __future__ import annotations

import copy
import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

FUSION_SCHEMA_VERSION = "fusion_schema.v1"

TONICS = ("C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B")
MODES = ("major", "minor")
TIME_SIGNATURES = ("2/4", "3/4", "4/4", "5/4", "6/8", "7/8", "9/8", "12/8")
EMOTIONS = ("happy", "sad", "tender", "calm", "tense", "angry", "epic", "playful", "mysterious", "nostalgic")
ENERGIES = ("low", "medium", "high")
PROMPT_LEVELS = ("full_spec", "musical", "scene", "intent")
# A chord symbol: root, accidental, quality, extension, added note, slash bass (C, F#m, Bbmaj7,
# Esus4, Cadd9, Am7/G). The pattern bounds the length (15 characters) by itself: xgrammar cannot
# combine a pattern with minLength/maxLength (vLLM then picks another backend, or refuses), and it
# reads a bounded repeat like [0-9]{0,2} as unbounded, so repeats are spelled out ([0-9]?[0-9]?).
CHORD_PATTERN = r"^[A-G][#b]?(maj|min|m|dim|aug|sus)?[0-9]?[0-9]?(add[0-9][0-9]?)?(/[A-G][#b]?)?$"

Tonic = Literal["C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B"]
Mode = Literal["major", "minor"]

_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: Any) -> Any:
    """Model output is untrusted too: no control or invisible format characters, one line,
    trimmed (before the length check, so a padded answer is not rejected for its padding)."""
    if not isinstance(text, str):
        return text
    text = "".join(" " if unicodedata.category(ch) in ("Zl", "Zp") else ch for ch in text
                   if unicodedata.category(ch) != "Cf")
    return " ".join(_UNSAFE.sub(" ", text).split())


def _non_empty(text: str) -> str:
    if not text:
        raise ValueError("empty text")
    return text


def Text(max_length: int, min_length: int = 1):  # noqa: N802 - a type factory
    # Constraints first, validators after: pydantic then keeps them in the JSON schema too.
    return Annotated[str, Field(min_length=min_length, max_length=max_length), BeforeValidator(_clean),
                     AfterValidator(_non_empty)]


Word = Text(32)
Chord = Annotated[str, Field(pattern=CHORD_PATTERN), BeforeValidator(_clean)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FusedAttributes(_Strict):
    tonic: Tonic
    mode: Mode
    tempo_bpm: float = Field(ge=30, le=300)
    time_signature: Literal["2/4", "3/4", "4/4", "5/4", "6/8", "7/8", "9/8", "12/8"]
    chord_progression: list[Chord] = Field(max_length=16)
    genres: list[Word] = Field(min_length=1, max_length=4)
    moods: list[Word] = Field(min_length=1, max_length=4)
    emotion: Literal["happy", "sad", "tender", "calm", "tense", "angry", "epic", "playful", "mysterious", "nostalgic"]
    instruments: list[Text(40)] = Field(max_length=8)
    energy: Literal["low", "medium", "high"]
    vocals_present: bool

    @property
    def key(self) -> str:
        return f"{self.tonic} {self.mode}"


class CaptionClaims(_Strict):
    """What the audio captions themselves said (null where they said nothing), so that their
    claims can be checked against the measurements apart from the fused answer."""

    tonic: Tonic | None
    mode: Mode | None
    tempo_bpm: float | None = Field(ge=20, le=400)
    chords: list[Chord] = Field(max_length=16)


class Prompts(_Strict):
    full_spec: Text(400)  # key, tempo, chords, instruments, mood
    musical: Text(300)  # genre, mood, instruments, tempo
    scene: Text(300)  # what the video shows + mood
    intent: Text(200)  # a creator's free-form one-sentence intent


class FusionAnswer(_Strict):
    attributes: FusedAttributes
    caption_claims: CaptionClaims
    prompts: Prompts


def _inline(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return _inline(copy.deepcopy(defs[name]), defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "description", "$defs")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def json_schema() -> dict:
    """FusionAnswer's JSON schema with every `$ref` inlined and titles dropped: plain objects,
    enums, anyOf-with-null, string/array length caps and a chord pattern (xgrammar and
    llguidance both take these)."""
    schema = FusionAnswer.model_json_schema()
    return _inline(schema, schema.get("$defs", {}))
