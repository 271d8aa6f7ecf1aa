"""The on-disk sample: its JSON member (validated), its array members, and its index row.

The index (`OUT/index/NNNNNN.parquet`, one file per shard, `INDEX_SCHEMA`) is a plain parquet
dataset: `pyarrow.dataset.dataset("OUT/index")`. Rows carry `schema_version`; bump SCHEMA_VERSION
when a column or a JSON section changes meaning. List columns (`moods`, `genres`, `instruments`,
`visual_tags`, `flags`, `members`) and `prompts` (a list of {level, text} structs) are nested, so
they filter with `pyarrow.compute.list_*` without opening a tar. Each index file's key-value
metadata holds its shard's checksum under SHARD_META_KEY: {shard, sha256, bytes, samples}."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 4  # 2: CLIP embeddings, visual tags, VAE latents; 3: captions, fused attributes and prompts;
# 4: shards and index files named by the keys they hold, the run_id column, retryable rejects

SHARD_META_KEY = b"video_robin.shard"  # index file metadata: the JSON checksum of its tar
# Index and rejects file metadata: {run_id, stages: {stage: {rows_in, rows_out, ...}}, counters} of
# the work whose results that file commits. The run record sums them over the files a run committed.
STATS_META_KEY = b"video_robin.stats"

REJECT_SCHEMA = pa.schema([
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("source_id", pa.string()),
    ("source_path", pa.string()),
    ("key", pa.string()),
    ("level", pa.string()),
    ("clip_index", pa.int32()),
    ("is_last_clip", pa.bool_()),
    ("retryable", pa.bool_()),  # transient (I/O) failure: the input is not finished, a rerun retries it
    ("run_id", pa.string()),
])


def shard_checksum(metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """{shard, sha256, bytes, samples} from an index file's schema metadata (None for old files)."""
    raw = (metadata or {}).get(SHARD_META_KEY)
    return json.loads(raw) if raw else None


# Row field -> tar member name. Arrays are stored as .npy (never pickled).
ARRAY_MEMBERS = {
    "rhythm": "rhythm.npy",
    "clip_embeddings": "clip.npy",
    "latent": "latent.npy",
    "latent_std": "latent_std.npy",
}


class ClipWindow(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    start: float
    end: float
    duration: float
    cut_times: list[float]
    shots: list[list[float]]
    decoder: str
    is_last: bool


class SampleMeta(BaseModel):
    """The `json` member. Sections produced by stages that did not run are absent."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    key: str
    source: dict[str, Any]
    probe: dict[str, Any]
    clip: ClipWindow
    music: dict[str, Any] | None = None
    visual: dict[str, Any] | None = None
    has_clip: bool = False  # clip.npy present (False when clip_embed was skipped or not run)
    has_latent: bool = False  # latent.npy / latent_std.npy present
    clip_embed: dict[str, Any] | None = None  # model, pretrained, dim, fps, precision of clip.npy
    visual_tags: dict[str, list[dict[str, Any]]] | None = None  # category -> [{tag, score}], best first
    latent: dict[str, Any] | None = None  # VAE preset, rate, hop, channels, frames of latent.npy
    captions: dict[str, Any] | None = None  # MusicFlamingo answers per prompt id, model, backend, errors
    fused: dict[str, Any] | None = None  # prompt_fusion: attributes, disagreements, provenance
    prompts: dict[str, str] | None = None
    prompt_source: dict[str, Any] | None = None
    flags: dict[str, Any] = {}


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("schema_version", pa.int32()),
    ("source_id", pa.string()),
    ("source_path", pa.string()),
    ("clip_index", pa.int32()),
    ("is_last_clip", pa.bool_()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("duration_s", pa.float64()),
    ("source_duration_s", pa.float64()),
    ("video_codec", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("fps", pa.float64()),
    ("audio_channels", pa.int32()),
    ("audio_sample_rate", pa.int32()),
    ("decoder", pa.string()),
    ("cut_count", pa.int32()),
    ("cuts_per_minute", pa.float64()),
    ("motion_mean", pa.float64()),
    ("cut_beat_alignment", pa.float64()),
    ("tempo_bpm", pa.float64()),
    ("beat_count", pa.int32()),
    ("key_name", pa.string()),
    ("tonic", pa.string()),
    ("mode", pa.string()),
    ("key_confidence", pa.float64()),
    ("chords", pa.string()),
    ("loudness_dbfs", pa.float64()),
    ("silence_ratio", pa.float64()),
    ("has_clip", pa.bool_()),
    ("has_latent", pa.bool_()),
    ("clip_model", pa.string()),
    ("vae_model", pa.string()),
    ("latent_frames", pa.int32()),
    ("visual_tags", pa.list_(pa.string())),  # "category:tag", the best tag of each category
    ("visual_tag_scores", pa.list_(pa.float32())),
    ("caption", pa.string()),  # MusicFlamingo's rich caption
    ("genres", pa.list_(pa.string())),
    ("moods", pa.list_(pa.string())),
    ("instruments", pa.list_(pa.string())),
    ("emotion", pa.string()),
    ("energy", pa.string()),
    ("vocals_present", pa.bool_()),
    ("time_signature", pa.string()),
    ("llm_disagreements", pa.list_(pa.string())),  # fields where captions disagreed with measurements
    ("prompt", pa.string()),
    ("prompt_source", pa.string()),
    ("prompt_fallback_reason", pa.string()),
    ("prompts", pa.list_(pa.struct([("level", pa.string()), ("text", pa.string())]))),
    ("members", pa.list_(pa.string())),
    ("flags", pa.list_(pa.string())),
    ("sample_bytes", pa.int64()),
    ("run_id", pa.string()),  # the run that wrote the sample
])


def index_row(meta: dict[str, Any], shard: str, members: list[str], sample_bytes: int, run_id: str = "") -> dict[str, Any]:
    """Every scalar a user filters on, so that browsing never opens a tar."""
    source, probe, clip = meta["source"], meta["probe"], meta["clip"]
    music, visual = meta.get("music") or {}, meta.get("visual") or {}
    video, audio = probe.get("video") or {}, probe.get("audio") or {}
    prompts = meta.get("prompts") or {}
    chords = [c["label"] for c in music.get("chords", [])]
    clip_embed, latent = meta.get("clip_embed") or {}, meta.get("latent") or {}
    fused = (meta.get("fused") or {}).get("attributes") or {}
    disagreements = (meta.get("fused") or {}).get("disagreements") or []
    composer = meta.get("prompt_source") or {}
    best_tags = [(cat, tags[0]) for cat, tags in (meta.get("visual_tags") or {}).items() if tags]
    return {
        "key": meta["key"],
        "shard": shard,
        "schema_version": meta.get("schema_version", SCHEMA_VERSION),
        "source_id": source["source_id"],
        "source_path": source["path"],
        "clip_index": clip["index"],
        "is_last_clip": clip["is_last"],
        "start_s": clip["start"],
        "end_s": clip["end"],
        "duration_s": clip["duration"],
        "source_duration_s": probe.get("duration"),
        "video_codec": video.get("codec"),
        "width": video.get("width"),
        "height": video.get("height"),
        "fps": video.get("fps"),
        "audio_channels": audio.get("channels"),
        "audio_sample_rate": audio.get("sample_rate"),
        "decoder": clip.get("decoder"),
        "cut_count": visual.get("cut_count"),
        "cuts_per_minute": visual.get("cuts_per_minute"),
        "motion_mean": visual.get("motion_mean"),
        "cut_beat_alignment": visual.get("cut_beat_alignment"),
        "tempo_bpm": music.get("tempo_bpm"),
        "beat_count": music.get("beat_count"),
        "key_name": music.get("key"),
        "tonic": music.get("tonic"),
        "mode": music.get("mode"),
        "key_confidence": music.get("key_confidence"),
        "chords": " ".join(chords),
        "loudness_dbfs": music.get("loudness_dbfs"),
        "silence_ratio": music.get("silence_ratio"),
        "has_clip": "clip.npy" in members,
        "has_latent": "latent.npy" in members,
        "clip_model": clip_embed.get("model"),
        "vae_model": latent.get("vae"),
        "latent_frames": latent.get("frames"),
        "visual_tags": [f"{cat}:{t['tag']}" for cat, t in best_tags],
        "visual_tag_scores": [t["score"] for _, t in best_tags],
        "caption": ((meta.get("captions") or {}).get("answers") or {}).get("caption"),
        "genres": fused.get("genres", []),
        "moods": fused.get("moods", []),
        "instruments": fused.get("instruments", []),
        "emotion": fused.get("emotion"),
        "energy": fused.get("energy"),
        "vocals_present": fused.get("vocals_present"),
        "time_signature": fused.get("time_signature"),
        "llm_disagreements": sorted({d.get("field", "?") for d in disagreements}),
        # The most specified level (the LLM's full_spec, the template's last); `prompts` holds all.
        "prompt": prompts.get("full_spec") or (list(prompts.values())[-1] if prompts else None),
        "prompt_source": composer.get("composer"),
        "prompt_fallback_reason": composer.get("fallback_reason"),
        "prompts": [{"level": k, "text": v} for k, v in prompts.items()],
        "members": members,
        "flags": sorted(k for k, v in (meta.get("flags") or {}).items() if v),
        "sample_bytes": sample_bytes,
        "run_id": run_id,
    }
