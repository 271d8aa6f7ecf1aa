"""`AudioVAE`: a stable-audio-tools Oobleck VAE (SongBloom's, Stable Audio Open's) run through
diffusers' `AutoencoderOobleck`, with the audio handling around it: mono -> stereo as SongBloom
does, resampling to the VAE's rate, padding to whole hops. The curation stage, the trainer and the
export tools all encode and decode through this one class."""
from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from model.oobleck import VaeConfigError, check_geometry, find_prefix, get_preset, parse_config, sat_to_diffusers
from pipeline.devices import torch_device, torch_dtype


def resolve_files(cfg: Any) -> tuple[str, str]:
    """(config path, checkpoint path) for a `vae_latents` config section: the local files it names,
    else the preset's Hugging Face repo (cache, then hub). Raises WeightsMissing."""
    from pipeline.weights import WeightsMissing, resolve

    p = get_preset(cfg.preset)
    wanted = [
        (cfg.config_file, p.config_filename, f"{p.name} VAE config", "vae_latents.config_file"),
        (cfg.checkpoint, p.checkpoint_filename, f"{p.name} VAE checkpoint", "vae_latents.checkpoint"),
    ]
    found, missing = [], []
    for local, filename, what, setting in wanted:  # both tried, so one message names every file to fetch
        try:
            found.append(resolve(local, p.repo, filename, what, setting))
        except WeightsMissing as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsMissing("; ".join(missing))
    return found[0], found[1]


def read_state_dict(path: str) -> dict:
    """A `.safetensors` file (only the tensors under the autoencoder's prefix), or a torch checkpoint
    (weights only) holding `state_dict` or the dict itself."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:  # a full model: read only the VAE's part
            keys = list(f.keys())
            prefix = find_prefix(keys, str(path))
            return {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise VaeConfigError(f"{path}: expected a dict of tensors or {{'state_dict': ...}}, found {type(data).__name__}")
    return state


def new_model(spec):
    """An AutoencoderOobleck of the spec's geometry (random weights)."""
    from diffusers import AutoencoderOobleck

    with warnings.catch_warnings():  # diffusers builds its convs with the deprecated weight_norm API
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated", category=FutureWarning)
        return AutoencoderOobleck(**spec.diffusers_kwargs())


class AudioVAE:
    def __init__(self, model, spec, preset, device, dtype, checkpoint: str = ""):
        self.model, self.spec, self.preset = model, spec, preset
        self.device, self.dtype, self.checkpoint = device, dtype, checkpoint

    @property
    def precision(self) -> str:
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(self.dtype).removeprefix("torch.")]

    @classmethod
    def load(cls, config_file: str, checkpoint: str, preset: str, device=None, precision: str = "auto") -> "AudioVAE":
        p = get_preset(preset)
        with open(config_file) as f:
            spec = parse_config(json.load(f), source=str(config_file))
        check_geometry(spec, p, str(config_file))
        model = new_model(spec)
        state = sat_to_diffusers(read_state_dict(checkpoint), model.state_dict(), len(spec.strides), source=str(checkpoint))
        model.load_state_dict(state, strict=True)
        return cls.from_model(model, spec, p, device, precision, str(checkpoint))

    @classmethod
    def from_model(cls, model, spec, preset, device=None, precision: str = "auto", checkpoint: str = "") -> "AudioVAE":
        """Wrap a loaded AutoencoderOobleck: weight norm folded, on the device, in its dtype."""
        import torch

        # Fold weight norm once (in fp32, before any cast): no per-call g*v/|v|, no low-precision norms.
        for module in model.modules():
            if hasattr(module, "weight_g"):
                torch.nn.utils.remove_weight_norm(module)
            elif hasattr(getattr(module, "parametrizations", None), "weight"):
                torch.nn.utils.parametrize.remove_parametrizations(module, "weight")
        device = torch.device(device if device is not None else torch_device())
        # Reduced precision only on a GPU: on CPU half precision is slow and lossy.
        dtype = torch_dtype(precision, device) if device.type == "cuda" else torch.float32
        model = model.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
        return cls(model, spec, preset, device, dtype, checkpoint)

    @property
    def hop(self) -> int:
        return self.preset.hop

    @property
    def sample_rate(self) -> int:
        return self.preset.sample_rate

    def prepare_audio(self, audio, sample_rate: int = 48000) -> np.ndarray:
        """[B, C, T] float32 at `sample_rate` -> [B, audio_channels, whole hops] at the VAE's rate."""
        x = audio.detach().cpu().numpy() if hasattr(audio, "detach") else np.asarray(audio)
        x = x.astype(np.float32, copy=False)
        if x.ndim != 3:
            raise ValueError(f"audio must be [batch, channels, samples]; got shape {x.shape}")
        want = self.preset.audio_channels
        if x.shape[1] == 1 and want > 1:
            x = np.repeat(x, want, axis=1)  # mono: the same signal on every channel, as SongBloom does
        if x.shape[1] != want:
            raise ValueError(f"audio has {x.shape[1]} channels; the {self.preset.name} VAE takes {want} (or mono)")
        if sample_rate != self.sample_rate:
            from scipy.signal import resample_poly

            r = Fraction(self.sample_rate, sample_rate)
            x = resample_poly(x, r.numerator, r.denominator, axis=-1).astype(np.float32)
        pad = (-x.shape[-1]) % self.hop
        if pad or x.shape[-1] == 0:
            x = np.pad(x, ((0, 0), (0, 0), (0, pad if x.shape[-1] else self.hop)))
        return np.ascontiguousarray(x)

    def encode(self, audio, sample_rate: int = 48000) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std, float32 [B, latent_dim, ceil(T' / hop)] (T' at the VAE's rate)."""
        import torch

        x = torch.from_numpy(self.prepare_audio(audio, sample_rate)).to(self.device, self.dtype)
        with torch.inference_mode():
            h = self.model.encoder(x).float()
            mean, scale = h.chunk(2, dim=1)
            std = torch.nn.functional.softplus(scale) + 1e-4
        return mean.cpu().numpy(), std.cpu().numpy()

    def decode(self, latent) -> np.ndarray:
        """[B, latent_dim, frames] -> float32 waveform [B, audio_channels, frames * hop] at the VAE's rate."""
        import torch

        z = latent if isinstance(latent, torch.Tensor) else torch.from_numpy(np.asarray(latent, np.float32))
        if z.dim() != 3 or z.shape[1] != self.spec.latent_dim:
            raise ValueError(f"latent must be [batch, {self.spec.latent_dim}, frames]; got {tuple(z.shape)}")
        with torch.inference_mode():
            y = self.model.decoder(z.to(self.device, self.dtype)).float()
            if self.spec.final_tanh:  # stable-audio-tools' decoder ends in tanh; diffusers' does not
                y = torch.tanh(y)
        return y.cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """What `meta["latent"]` records besides the frame count."""
        return {
            "vae": self.preset.name, "sample_rate": self.sample_rate, "hop": self.hop,
            "latent_hz": round(self.preset.latent_hz, 6), "channels": self.spec.latent_dim,
            "precision": self.precision, "device": self.device.type, "checkpoint": Path(self.checkpoint).name,
        }


def frames_for(samples: int, sample_rate: int, preset: str) -> int:
    """Latent frames `encode` yields for `samples` at `sample_rate` (resampled, then padded)."""
    p = get_preset(preset)
    n = samples if sample_rate == p.sample_rate else math.ceil(samples * p.sample_rate / sample_rate)
    return max(1, math.ceil(n / p.hop))
