"""Oobleck VAEs (stable-audio-tools) loaded into diffusers' `AutoencoderOobleck`.

Three parts, all pure functions on dicts and tensors:
  presets        the geometry each VAE we know must have (sample rate, strides, latent size)
  parse_config   a stable-audio-tools config JSON (a plain autoencoder, or a full model whose
                 `pretransform` holds one) -> `OobleckSpec` -> AutoencoderOobleck kwargs
  conversion     stable-audio-tools state dict <-> diffusers state dict, exact or a precise error

Layouts (stable-audio-tools 0.0.19 `models/autoencoders.py` vs diffusers `autoencoder_oobleck.py`),
with N = len(strides):
  encoder.layers.0                       encoder.conv1
  encoder.layers.{i+1}.layers.{r}        encoder.block.{i}.res_unit{r+1}   (r = 0, 1, 2)
  encoder.layers.{i+1}.layers.3 / .4     encoder.block.{i}.snake1 / .conv1
  encoder.layers.{N+1} / {N+2}           encoder.snake1 / encoder.conv2
  decoder.layers.0                       decoder.conv1
  decoder.layers.{i+1}.layers.0 / .1     decoder.block.{i}.snake1 / .conv_t1
  decoder.layers.{i+1}.layers.{r+2}      decoder.block.{i}.res_unit{r+1}
  decoder.layers.{N+1} / {N+2}           decoder.snake1 / decoder.conv2  ({N+3} is Tanh or Identity)
  residual unit .layers.0/1/2/3          .snake1 / .conv1 / .snake2 / .conv2
Snake alpha/beta are (C,) there and (1, C, 1) here (both log-scale). Convs are weight-normed in
both: `weight_g`/`weight_v`, or `parametrizations.weight.original0/1` with torch's newer API; a
checkpoint with weight norm already folded (`weight`) is split back into g and v exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class VaeConfigError(ValueError):
    """The config or checkpoint is not the Oobleck VAE the preset asks for; says what and where."""


@dataclass(frozen=True)
class VaePreset:
    name: str
    repo: str | None  # Hugging Face repo holding both files; None: local files only
    config_filename: str
    checkpoint_filename: str
    sample_rate: int
    strides: tuple[int, ...]
    latent_dim: int
    audio_channels: int = 2

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def latent_hz(self) -> float:
        return self.sample_rate / self.hop


PRESETS = {
    p.name: p
    for p in (
        VaePreset("songbloom", "CypressYang/SongBloom", "stable_audio_1920_vae.json", "autoencoder_music_dsp1920.ckpt",
                  48000, (2, 4, 4, 6, 10), 64),
        VaePreset("stable_audio_open", "stabilityai/stable-audio-open-1.0", "model_config.json", "model.safetensors",
                  44100, (2, 4, 4, 8, 8), 64),
        # Tests only (tests/tiny_vae.py writes it): SongBloom's rate and hop, a few thousand weights.
        VaePreset("tiny", None, "tiny_vae.json", "tiny_vae.ckpt", 48000, (2, 4, 4, 6, 10), 8),
    )
}


def get_preset(name: str) -> VaePreset:
    if name not in PRESETS:
        raise VaeConfigError(f"unknown VAE preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class OobleckSpec:
    """What a stable-audio-tools Oobleck VAE config says, in the terms AutoencoderOobleck needs."""

    sample_rate: int
    strides: tuple[int, ...]
    channels: int  # encoder width before the multiples; also its output width (mean + scale)
    c_mults: tuple[int, ...]
    decoder_channels: int
    latent_dim: int  # the decoder's input: half of what the encoder emits
    audio_channels: int
    final_tanh: bool  # the decoder ends in tanh (diffusers' does not: AudioVAE applies it)
    embedded: bool  # the autoencoder is a full model's pretransform (weights under a prefix)

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    def diffusers_kwargs(self) -> dict[str, Any]:
        return dict(
            encoder_hidden_size=self.channels, downsampling_ratios=list(self.strides), channel_multiples=list(self.c_mults),
            decoder_channels=self.decoder_channels, decoder_input_channels=self.latent_dim,
            audio_channels=self.audio_channels, sampling_rate=self.sample_rate,
        )

    def to_sat_config(self) -> dict[str, Any]:
        """A plain stable-audio-tools autoencoder config with this geometry (tests write these)."""
        common = dict(channels=self.channels, c_mults=list(self.c_mults), strides=list(self.strides), use_snake=True)
        return {
            "model_type": "autoencoder", "sample_rate": self.sample_rate, "audio_channels": self.audio_channels,
            "model": {
                "encoder": {"type": "oobleck", "config": {"in_channels": self.audio_channels, **common,
                                                          "latent_dim": 2 * self.latent_dim}},
                "decoder": {"type": "oobleck", "config": {"out_channels": self.audio_channels, **common,
                                                          "channels": self.decoder_channels, "latent_dim": self.latent_dim,
                                                          "final_tanh": self.final_tanh}},
                "bottleneck": {"type": "vae"}, "latent_dim": self.latent_dim, "downsampling_ratio": self.hop,
                "io_channels": self.audio_channels,
            },
        }


def parse_config(config: dict, source: str = "config") -> OobleckSpec:
    """A stable-audio-tools config -> OobleckSpec; VaeConfigError naming the field for anything
    AutoencoderOobleck cannot represent exactly."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise VaeConfigError(f"{source}: {what}")

    model = config.get("model")
    need(isinstance(model, dict), "no 'model' section (not a stable-audio-tools model config)")
    embedded = "pretransform" in model
    if embedded:
        pre = model["pretransform"]
        need(pre.get("type") == "autoencoder", f"model.pretransform.type is {pre.get('type')!r}, expected 'autoencoder'")
        ae, where = pre.get("config", {}), "model.pretransform.config"
    else:
        ae, where = model, "model"
    sample_rate = config.get("sample_rate")
    need(isinstance(sample_rate, int), f"sample_rate missing or not an integer: {sample_rate!r}")
    for part in ("encoder", "decoder"):
        kind = ae.get(part, {}).get("type")
        need(kind == "oobleck", f"{where}.{part}.type is {kind!r}; only 'oobleck' maps onto AutoencoderOobleck")
    bottleneck = (ae.get("bottleneck") or {}).get("type")
    need(bottleneck == "vae", f"{where}.bottleneck.type is {bottleneck!r}, expected 'vae' (mean + scale)")
    # stable-audio-tools' constructor defaults, for keys a config leaves out
    enc = {"in_channels": 2, "channels": 128, "latent_dim": 32, "c_mults": [1, 2, 4, 8], "strides": [2, 4, 8, 8],
           "use_snake": False, "antialias_activation": False, **ae["encoder"].get("config", {})}
    dec = {"out_channels": 2, "channels": 128, "latent_dim": 32, "c_mults": [1, 2, 4, 8], "strides": [2, 4, 8, 8],
           "use_snake": False, "antialias_activation": False, "use_nearest_upsample": False, "final_tanh": True,
           **ae["decoder"].get("config", {})}
    e, d = f"{where}.encoder.config", f"{where}.decoder.config"
    for name, cfg in ((e, enc), (d, dec)):
        need(cfg["use_snake"] is True, f"{name}.use_snake is {cfg['use_snake']}; AutoencoderOobleck has Snake activations only")
        need(not cfg["antialias_activation"], f"{name}.antialias_activation is set; AutoencoderOobleck has no anti-aliasing")
    need(not dec["use_nearest_upsample"], f"{d}.use_nearest_upsample is set; AutoencoderOobleck upsamples by transposed conv")
    need(list(enc["strides"]) == list(dec["strides"]), f"encoder strides {enc['strides']} != decoder strides {dec['strides']}")
    need(list(enc["c_mults"]) == list(dec["c_mults"]), f"encoder c_mults {enc['c_mults']} != decoder c_mults {dec['c_mults']}")
    need(enc["latent_dim"] == 2 * dec["latent_dim"],
         f"{e}.latent_dim {enc['latent_dim']} is not 2 x {d}.latent_dim {dec['latent_dim']} (a VAE encoder emits mean + scale)")
    need(enc["channels"] == enc["latent_dim"],
         f"{e}.channels {enc['channels']} != {e}.latent_dim {enc['latent_dim']}; AutoencoderOobleck uses one "
         "encoder_hidden_size for both")
    need(enc["in_channels"] == dec["out_channels"],
         f"{e}.in_channels {enc['in_channels']} != {d}.out_channels {dec['out_channels']}")
    for key, want in (("latent_dim", dec["latent_dim"]), ("downsampling_ratio", math.prod(enc["strides"])),
                      ("io_channels", enc["in_channels"])):
        need(ae.get(key, want) == want, f"{where}.{key} is {ae.get(key)!r} but the encoder/decoder say {want}")
    return OobleckSpec(
        sample_rate=sample_rate, strides=tuple(enc["strides"]), channels=enc["channels"], c_mults=tuple(enc["c_mults"]),
        decoder_channels=dec["channels"], latent_dim=dec["latent_dim"], audio_channels=enc["in_channels"],
        final_tanh=bool(dec["final_tanh"]), embedded=embedded,
    )


def check_geometry(spec: OobleckSpec, preset: VaePreset, source: str) -> None:
    """The config must describe the preset's VAE: one line per field that differs."""
    wrong = []
    for field in ("sample_rate", "strides", "latent_dim", "audio_channels"):
        want, got = getattr(preset, field), getattr(spec, field)
        if want != got:
            hop = f" (hop {preset.hop} vs {spec.hop})" if field == "strides" else ""
            wrong.append(f"{field}: expected {list(want) if field == 'strides' else want}, "
                         f"found {list(got) if field == 'strides' else got}{hop}")
    if wrong:
        raise VaeConfigError(f"{source} does not describe the {preset.name!r} VAE: " + "; ".join(wrong))


# --- state dict conversion ---------------------------------------------------------------

KNOWN_PREFIXES = ("", "model.", "autoencoder.", "vae.", "module.", "pretransform.model.", "model.pretransform.model.",
                  "autoencoder.model.", "module.autoencoder.")
RES = ("snake1", "conv1", "snake2", "conv2")  # residual unit .layers.0..3


def module_map(n_blocks: int) -> dict[str, tuple[str, str]]:
    """stable-audio-tools module path -> (diffusers module path, "conv" | "snake")."""
    m: dict[str, tuple[str, str]] = {"encoder.layers.0": ("encoder.conv1", "conv"), "decoder.layers.0": ("decoder.conv1", "conv")}

    def res(src: str, dst: str) -> None:
        for j, name in enumerate(RES):
            m[f"{src}.layers.{j}"] = (f"{dst}.{name}", "snake" if name.startswith("snake") else "conv")

    for i in range(n_blocks):
        s, t = f"encoder.layers.{i + 1}.layers", f"encoder.block.{i}"
        for r in range(3):
            res(f"{s}.{r}", f"{t}.res_unit{r + 1}")
        m[f"{s}.3"], m[f"{s}.4"] = (f"{t}.snake1", "snake"), (f"{t}.conv1", "conv")
        s, t = f"decoder.layers.{i + 1}.layers", f"decoder.block.{i}"
        m[f"{s}.0"], m[f"{s}.1"] = (f"{t}.snake1", "snake"), (f"{t}.conv_t1", "conv")
        for r in range(3):
            res(f"{s}.{r + 2}", f"{t}.res_unit{r + 1}")
    for part in ("encoder", "decoder"):
        m[f"{part}.layers.{n_blocks + 1}"] = (f"{part}.snake1", "snake")
        m[f"{part}.layers.{n_blocks + 2}"] = (f"{part}.conv2", "conv")
    return m


# parameter names of a weight-normed conv, old API and parametrizations, to one canonical name
CANON = {"weight_g": "g", "weight_v": "v", "parametrizations.weight.original0": "g",
         "parametrizations.weight.original1": "v", "bias": "bias", "alpha": "alpha", "beta": "beta", "weight": "weight"}


def _split(key: str) -> tuple[str, str]:
    for param in sorted(CANON, key=len, reverse=True):
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    return key.rsplit(".", 1)[0], key.rsplit(".", 1)[-1]


def find_prefix(keys: list[str], source: str) -> str:
    """The prefix the autoencoder's weights sit under: the known one that most keys agree on."""
    counts = {p: sum(k.startswith((p + "encoder.layers.", p + "decoder.layers.")) for k in keys) for p in KNOWN_PREFIXES}
    best = max(counts, key=lambda p: (counts[p], len(p)))
    if counts[best] == 0:
        raise VaeConfigError(f"{source}: no Oobleck encoder/decoder weights ('encoder.layers.*', 'decoder.layers.*') "
                             f"under any known prefix {list(KNOWN_PREFIXES)}; first keys: {sorted(keys)[:5]}")
    return best


def _fmt(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def sat_to_diffusers(state: dict, target: dict, n_blocks: int, source: str = "checkpoint") -> dict:
    """Convert a stable-audio-tools state dict to the keys and shapes of `target` (an
    AutoencoderOobleck state dict). Weights outside the autoencoder's prefix (the rest of a full
    model, a training wrapper's discriminator) are ignored only when that prefix is not empty;
    anything else that does not map, is missing or has the wrong shape is a VaeConfigError."""
    import torch

    prefix = find_prefix(list(state), source)
    mods = module_map(n_blocks)
    new_api = any(".parametrizations.weight." in k for k in target)
    out: dict[str, Any] = {}
    expected = {}  # target key -> the source key that should fill it (for "missing")
    for src, (dst, kind) in mods.items():
        names = ("alpha", "beta") if kind == "snake" else ("weight_g", "weight_v", "bias")
        for n in names:
            t = f"{dst}.{n}"
            if new_api and n in ("weight_g", "weight_v"):
                t = f"{dst}.parametrizations.weight.original{0 if n == 'weight_g' else 1}"
            if t in target:
                expected[t] = f"{prefix}{src}.{n}"
    unexpected, shapes, bad = [], [], set()
    for key, value in state.items():
        if not key.startswith(prefix):  # outside the autoencoder (only possible with a prefix)
            continue
        mod, param = _split(key[len(prefix):])
        dst, kind = mods.get(mod, (None, None))
        canon = CANON.get(param)
        g_key, v_key = (f"{dst}.parametrizations.weight.original{i}" if new_api else f"{dst}.weight_{n}"
                        for i, n in ((0, "g"), (1, "v")))
        if kind == "snake" and canon in ("alpha", "beta"):
            t = f"{dst}.{canon}"
            items = [(t, value.reshape(target[t].shape) if t in target and value.numel() == target[t].numel()
                      and value.dim() in (1, 3) else value)]
        elif kind == "conv" and canon == "weight":  # weight norm folded: w = g v/|v| holds for g = |w|, v = w
            norm = torch.linalg.vector_norm(value.float(), dim=tuple(range(1, value.dim())), keepdim=True)
            items = [(g_key, norm.to(value.dtype)), (v_key, value)]
        elif kind == "conv" and canon in ("g", "v", "bias"):
            items = [({"g": g_key, "v": v_key, "bias": f"{dst}.bias"}[canon], value)]
        else:
            unexpected.append(key)
            continue
        for t, v in items:
            if t not in target:
                unexpected.append(key)
            elif tuple(v.shape) != tuple(target[t].shape):
                want = target[t].shape
                want = (want[1],) if kind == "snake" else tuple(want)  # in the checkpoint's own layout
                shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs expected {want}")
                bad.add(t)
            else:
                out[t] = v
    missing = sorted(expected.get(t, t) for t in target if t not in out and t not in bad)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_fmt(sorted(unexpected))}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_fmt(shapes)}")
    if problems:
        where = f" (weights under prefix {prefix!r})" if prefix else ""
        raise VaeConfigError(f"{source} does not match the Oobleck VAE its config describes{where}: " + "; ".join(problems))
    return out


def diffusers_to_sat(state: dict, n_blocks: int, prefix: str = "") -> dict:
    """The inverse, into stable-audio-tools' layout with the old weight-norm names (what its
    checkpoints hold); tests use it to write checkpoints."""
    inverse = {dst: src for src, (dst, _) in module_map(n_blocks).items()}
    out = {}
    for key, value in state.items():
        mod, param = _split(key)
        canon = CANON.get(param)
        name = {"g": "weight_g", "v": "weight_v"}.get(canon, param)
        if mod not in inverse or canon is None:
            raise VaeConfigError(f"diffusers key {key!r} has no stable-audio-tools counterpart")
        out[f"{prefix}{inverse[mod]}.{name}"] = value.reshape(-1) if canon in ("alpha", "beta") else value
    return out

