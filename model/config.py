"""Video-Robin's configuration: one dataclass, named presets (`debug` for CPU tests, `base`, `large`).

The data geometry fields (latent channels, CLIP width, rhythm channels) are overwritten from the
shards at the start of training, so a preset only fixes the network's sizes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass
class VideoRobinConfig:
    # Data geometry (taken from the shards by train.py).
    latent_channels: int = 64  # SongBloom VAE: 64 channels at 25 Hz
    latent_rate: float = 25.0
    max_frames: int = 256  # 10 s = 250 frames, padded to a whole number of patches
    patch: int = 16  # frames per patch (0.64 s)
    clip_dim: int = 768  # CLIP embedding width (ViT-L-14: 768, ViT-B-32: 512)
    use_video: bool = False  # stage v2m: CLIP frame tokens through the video projection
    use_rhythm: bool = False  # visual rhythm channels (cut, motion) of rhythm.npy as extra conditioning
    rhythm_channels: int = 2
    # Video tokens: "patch" = the CLIP frame nearest each latent patch's centre (N = patches);
    # "frames" = every CLIP frame at video_fps (the pipeline's 4 fps: 40 tokens for 10 s), an ablation.
    video_tokens: str = "patch"
    video_fps: float = 4.0

    # Text: "bytes" = UTF-8 byte tokenizer (needs no files); otherwise an AutoTokenizer path or id.
    tokenizer: str = "bytes"
    text_max_tokens: int = 256

    # AR backbone: a transformers decoder LM built from its config (lm_init: a pretrained small LM).
    lm_arch: str = "qwen3"
    lm_init: str | None = None
    lm_hidden: int = 768
    lm_layers: int = 12
    lm_heads: int = 12
    lm_kv_heads: int = 4
    lm_ffn: int = 2048

    # Plan bottleneck and its integration.
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    rite_layers: int = 2
    rite_heads: int = 8
    # Ablations: use_fsq=False keeps the plan continuous (the same projection, no quantiser);
    # use_rite=False makes the plan a per-patch projection of the codes (no residual, no encoder).
    use_fsq: bool = True
    use_rite: bool = True

    # Loc-DiT refinement head.
    dit_hidden: int = 512
    dit_layers: int = 8
    dit_heads: int = 8

    # Rectified flow: logit-normal t during training, Euler steps and CFG when sampling.
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0
    sample_steps: int = 32
    cfg_scale: float = 1.5

    # Condition dropout (for classifier-free guidance), each condition separately.
    p_drop_text: float = 0.1
    p_drop_video: float = 0.1
    p_drop_plan: float = 0.1

    @property
    def patches(self) -> int:
        return self.max_frames // self.patch

    @property
    def video_len(self) -> int:
        """Video tokens per sample (cfg.use_video)."""
        if self.video_tokens == "patch":
            return self.patches
        return math.ceil(self.max_frames / self.latent_rate * self.video_fps - 1e-9)

    def __post_init__(self) -> None:
        self.fsq_levels = tuple(self.fsq_levels)
        if self.video_tokens not in ("patch", "frames"):
            raise ValueError(f"video_tokens={self.video_tokens!r}: choose 'patch' or 'frames'")
        if self.video_fps <= 0:
            raise ValueError(f"video_fps must be positive, got {self.video_fps}")
        if self.max_frames % self.patch:
            raise ValueError(f"max_frames={self.max_frames} is not a whole number of patches of {self.patch}")
        # RITE runs at the DiT's width: it turns the LM's plan into the DiT's condition.
        for name, hidden in (("lm", self.lm_hidden), ("rite", self.dit_hidden), ("dit", self.dit_hidden)):
            heads = getattr(self, f"{name}_heads")
            if hidden % heads:
                raise ValueError(f"{name}: width {hidden} is not divisible by {heads} heads")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoRobinConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Video-Robin config fields: {sorted(unknown)}")
        return cls(**d)

    def override(self, **changes: Any) -> "VideoRobinConfig":
        return replace(self, **changes)


PRESETS: dict[str, VideoRobinConfig] = {
    # Tiny enough to train hundreds of steps on 2 CPU cores in seconds.
    "debug": VideoRobinConfig(
        lm_hidden=64, lm_layers=2, lm_heads=2, lm_kv_heads=1, lm_ffn=128,
        rite_layers=1, rite_heads=2, dit_hidden=64, dit_layers=2, dit_heads=2,
        text_max_tokens=64, sample_steps=8,
    ),
    # ~110M parameters (LM 76M, Loc-DiT 26M, RITE 7M): one GPU.
    "base": VideoRobinConfig(),
    # ~835M parameters: SongBloom-like widths.
    "large": VideoRobinConfig(
        lm_hidden=1536, lm_layers=24, lm_heads=16, lm_kv_heads=8, lm_ffn=4096,
        rite_layers=4, rite_heads=16, dit_hidden=1024, dit_layers=12, dit_heads=16,
    ),
}


def preset(name: str, **overrides: Any) -> VideoRobinConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].override(**overrides) if overrides else PRESETS[name]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> typed overrides (types from the dataclass defaults)."""
    types = {f.name: f for f in fields(VideoRobinConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"bad model override {item!r}: expected key=value with key one of {sorted(types)}")
        default = getattr(PRESETS["base"], key)
        if isinstance(default, bool):
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, tuple):
            out[key] = tuple(int(v) for v in raw.split(","))
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float):
            out[key] = float(raw)
        else:
            out[key] = None if raw.lower() in ("", "none", "null") else raw
    return out

