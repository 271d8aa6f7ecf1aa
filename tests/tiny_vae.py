"""A tiny random Oobleck VAE in stable-audio-tools' layout, for the `tiny` preset: SongBloom's rate,
strides and hop (48 kHz, 1920, 25 Hz), 8 latent channels, ~0.3M weights
(~3 s to encode 10 s of audio on 2 CPU cores). Tests
that need a VAE import it: `from tiny_vae import make_tiny_vae`."""
from __future__ import annotations

import json
from pathlib import Path

from model.oobleck import PRESETS, OobleckSpec, diffusers_to_sat

TINY = PRESETS["tiny"]


def tiny_spec(final_tanh: bool = False) -> OobleckSpec:
    # diffusers uses one encoder width for the first conv and the output (mean + scale): 2 x latent_dim
    return OobleckSpec(sample_rate=TINY.sample_rate, strides=TINY.strides, channels=2 * TINY.latent_dim,
                       c_mults=(1, 2, 2, 4, 4), decoder_channels=4, latent_dim=TINY.latent_dim,
                       audio_channels=TINY.audio_channels, final_tanh=final_tanh, embedded=False)


def randomize_(module, seed: int) -> None:
    """Non-trivial Snake parameters (they start at zero) so that a wrong mapping shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make_tiny_vae(folder, seed: int = 0, final_tanh: bool = False) -> tuple[str, str]:
    """Writes `tiny_vae.json` + `tiny_vae.ckpt` ({"state_dict": ...}) into `folder`; returns their paths."""
    import torch

    from model.vae import new_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(final_tanh)
    torch.manual_seed(seed)
    model = new_model(spec)
    randomize_(model, seed)
    config_path, ckpt_path = folder / TINY.config_filename, folder / TINY.checkpoint_filename
    config_path.write_text(json.dumps(spec.to_sat_config(), indent=1))
    state = diffusers_to_sat({k: v.detach().clone() for k, v in model.state_dict().items()}, len(spec.strides))
    torch.save({"state_dict": state}, ckpt_path)
    return str(config_path), str(ckpt_path)
