"""Run configuration: pydantic models, YAML presets in pipeline/configs/, key=value overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).parent / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourcesConfig(Strict):
    extensions: list[str] = [".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi", ".m4a"]
    recursive: bool = True
    # Remote inputs (s3://, gs://, https://) are decoded as they stream (PyAV over range reads); a
    # local copy is the fallback for what cannot stream, at most this many bytes at once per worker.
    max_local_copy_bytes: int = 8 << 30
    # Transient I/O errors (throttling, connection resets, a store that is briefly down) are retried
    # this many times with exponential backoff before the input is deferred to the next run.
    io_attempts: int = 6
    io_backoff_seconds: float = 1.0


class ProbeConfig(Strict):
    max_seconds: float = 4 * 3600.0  # longer inputs are rejected as too_long
    require_audio: bool = True


class SegmentConfig(Strict):
    adaptive_threshold: float = 3.0
    min_content_val: float = 15.0
    min_shot_seconds: float = 0.5
    # A clip may start up to this much later than the previous clip's end so that it begins on a cut.
    snap_seconds: float = 2.0
    max_clips_per_video: int | None = None


class MusicDSPConfig(Strict):
    silence_dbfs: float = -60.0  # frames quieter than this count as silent
    max_silence_ratio: float = 0.5  # clips more silent than this are rejected
    chord_min_seconds: float = 0.5
    start_bpm: float = 120.0  # beat tracker's tempo prior centre (librosa beat_track)
    tightness: float = 100.0  # how strictly beats follow the tempo (librosa beat_track)
    onset_latency_seconds: float = 0.025  # onset-envelope lag subtracted from beat times
    key_profile: Literal["krumhansl", "temperley", "aarden", "bellman", "simple"] = "krumhansl"
    key_bass_weight: float = 0.25  # weight of the bass-octave chroma in the key's pitch profile
    key_harmony_weight: float = 0.4  # weight of the chord-function (I, IV, V...) evidence for a key
    key_cadence_weight: float = 0.1  # key score bonus when the first/last chord is its tonic triad
    chord_stay_prob: float = 0.97  # Viterbi self-transition per 32 ms chroma frame
    estimate_tuning: bool = True  # estimate detuning from A440 before the chroma CQT


class VisualRhythmConfig(Strict):
    beat_tolerance_seconds: float = 0.5  # VeM's TB-IoU tolerance
    min_alignment: float | None = None  # reject clips whose cuts align worse than this


OnMissing = Literal["fail", "skip"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]  # auto: bf16 on a GPU, fp32 on CPU


class ClipEmbedConfig(Strict):
    model: str = "ViT-B-32"  # an open_clip model name
    # An open_clip pretrained tag (resolved through the Hugging Face cache or hub) or a local file.
    pretrained: str = "laion2b_s34b_b79k"
    config_file: str | None = None  # JSON config for a model open_clip does not ship (tests' tiny one)
    tags: str = "visual_tags.v1"  # zero-shot vocabulary in prompts/
    top_k: int = 3  # tags kept per category
    precision: Precision = "auto"
    batch_size: int = 8  # clips per call; every clip brings clip_seconds x frame_fps frames
    num_gpus: float = 0.0  # a fraction lets CLIP share a GPU with the VAE and the LLM servers
    num_cpus: float = 0.0  # reserves no CPU: a 1- or 2-CPU Ray must still run the decode tasks
    pool_size: int = 1
    on_missing: OnMissing = "fail"  # no weights: fail the run, or skip the stage and say so


class VaeLatentsConfig(Strict):
    preset: Literal["songbloom", "stable_audio_open", "tiny"] = "songbloom"
    # Local files in stable-audio-tools' layout; unset: the preset's Hugging Face repo (cache, then hub).
    config_file: str | None = None  # e.g. stable_audio_1920_vae.json
    checkpoint: str | None = None  # e.g. autoencoder_music_dsp1920.ckpt
    precision: Precision = "auto"
    batch_size: int = 4
    num_gpus: float = 0.0
    num_cpus: float = 0.0  # reserves no CPU: a 1- or 2-CPU Ray must still run the decode tasks
    pool_size: int = 1
    on_missing: OnMissing = "fail"


class LLMServerConfig(Strict):
    """A vLLM OpenAI-compatible server the pipeline starts itself: one Ray actor owns the server
    process, which runs from its own environment (vLLM's pins clash with ours)."""

    python: str = ".venv-vllm/bin/python"  # interpreter of an environment with vllm installed
    num_gpus: float = 1.0
    num_cpus: float = 2.0
    args: list[str] = []  # more `api_server` arguments, e.g. [--max-model-len, "8192"]
    env: dict[str, str] = {}
    startup_timeout_s: float = 900.0


class LLMEndpointConfig(Strict):
    """Where an LLM stage sends its requests: a running server (`endpoint`), or one the pipeline
    starts (`serve: true`). With neither, the stage falls back as its section says."""

    endpoint: str | None = None  # e.g. http://10.0.0.5:8000/v1
    model: str = ""  # the served model name
    serve: bool = False
    server: LLMServerConfig = LLMServerConfig()
    api_key_env: str | None = None  # name of an environment variable holding the API key
    max_concurrency: int = 32  # requests in flight per worker
    timeout_s: float = 120.0  # per request
    retries: int = 3  # per request, with exponential backoff
    batch_size: int = 64  # clips per call: enough to keep max_concurrency requests in flight
    pool_size: int = 1
    num_cpus: float = 0.0  # waits on HTTP; reserving CPU would starve the decode tasks on small Rays


class FusionConfig(LLMEndpointConfig):
    """prompt_fusion: Qwen3-8B (thinking off) turns caption + measurements + visual tags into
    normalised attributes and prompts, as JSON that follows a schema."""

    model: str = "Qwen/Qwen3-8B"
    template: str = "fusion.v1"  # prompts/fusion.v1.txt
    max_tokens: int = 1024
    temperature: float = 0.7  # Qwen3's suggested non-thinking sampling
    top_p: float = 0.8
    top_k: int = 20
    attempts: int = 2  # answers that fail validation are asked again, then the template composer
    tempo_tolerance_pct: float = 4.0  # caption vs measured tempo (octave errors count as agreeing)
    cache: bool = True  # answers kept by content hash under OUT/cache/, so a resumed run does not ask again
    drop_vocals: bool = False  # reject clips whose fused attributes say vocals are present


class CaptionsConfig(LLMEndpointConfig):
    """music_captions: MusicFlamingo describes each clip's audio (16 kHz mono)."""

    model: str = "nvidia/music-flamingo-2601-hf"
    backend: Literal["vllm", "transformers"] = "vllm"
    prompts: str = "music_caption.v1"  # prompts/music_caption.v1.yaml
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    weights: str | None = None  # transformers backend: a local model folder (else the HF cache/hub)
    precision: Precision = "auto"
    num_gpus: float = 0.0  # transformers backend only
    on_missing: OnMissing = "skip"  # no endpoint / weights: skip the stage (fusion then works without captions)


class PromptConfig(Strict):
    template: str = "template.v1"


class WriterConfig(Strict):
    samples_per_shard: int = 256
    max_shard_bytes: int = 1_000_000_000
    write_audio: bool = True  # original audio as 48 kHz stereo FLAC
    write_thumbnail: bool = True
    # Share of sources held out as the `test` split (by a hash of source_id: shards/split.py); keep it
    # fixed across runs of one dataset, or sources move between splits.
    test_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # Shards are written by Ray tasks, as many at once as the cluster allows (null) or at most this
    # many. Each reserves num_cpus: FLAC and JPEG encoding and the upload are CPU work.
    workers: int | None = None
    num_cpus: float = 0.5


class RunnerConfig(Strict):
    engine: Literal["ray", "loop"] = "ray"
    ray_address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    video_workers: int | None = None  # concurrent decode+segment tasks; None lets Ray decide
    # Inputs go through in chunks: probe a chunk (results to OUT/probe/), dedupe it against what came
    # before, stream its sources. Chunks start small so that the first shard lands early, then double
    # up to this size; driver memory is bounded by one chunk, whatever the input count (bench/scale.py:
    # it follows the chunk size, so one machine keeps chunks small; the cluster preset has more CPUs to feed).
    chunk_sources: int = 2048
    first_chunk_sources: int = 256
    sources_per_block: int = 4  # sources per Ray Data block of the streaming phase
    fuse_cpu_stages: bool = True  # consecutive stateless CPU stages share one task (false: one operator each)
    progress_bars: bool = True  # the run's one progress bar (Ray Data's own bars: --verbose)


class Config(Strict):
    clip_seconds: float = 10.0
    frame_fps: float = 4.0  # frames kept per second for CLIP embeddings and thumbnails
    frame_size: int = 224  # frames kept as frame_size x frame_size centre crops
    sources: SourcesConfig = SourcesConfig()
    probe: ProbeConfig = ProbeConfig()
    segment: SegmentConfig = SegmentConfig()
    music_dsp: MusicDSPConfig = MusicDSPConfig()
    visual_rhythm: VisualRhythmConfig = VisualRhythmConfig()
    clip_embed: ClipEmbedConfig = ClipEmbedConfig()
    vae_latents: VaeLatentsConfig = VaeLatentsConfig()
    captions: CaptionsConfig = CaptionsConfig()
    llm: FusionConfig = FusionConfig()
    prompts: PromptConfig = PromptConfig()
    writer: WriterConfig = WriterConfig()
    runner: RunnerConfig = RunnerConfig()
    stages: list[str] = Field(
        default_factory=lambda: [
            "probe", "segment", "music_dsp", "visual_rhythm", "clip_embed", "vae_latents", "music_captions",
            "prompt_fusion", "writer",
        ]
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value (e.g. writer.samples_per_shard=64)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def _set(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"cannot set {'.'.join(path)}: {part} is not a section")
    tree[path[-1]] = value


def load_config(file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Preset (a path, or a name in pipeline/configs/) merged with key=value overrides."""
    data: dict = {}
    if file:
        path = Path(file)
        if not path.exists() and (CONFIG_DIR / f"{file}.yaml").exists():
            path = CONFIG_DIR / f"{file}.yaml"
        data = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        _set(data, *parse_override(text))
    return Config.model_validate(data)
