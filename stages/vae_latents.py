"""vae_latents: each clip's 48 kHz stereo audio -> the music VAE's posterior, the latents Video-Robin
trains on. SongBloom's VAE by default (stable-audio-tools Oobleck, 48 kHz, hop 1920 -> 25 Hz, 64
channels: a 10 s clip is [64, 250]), run through diffusers' AutoencoderOobleck (model/vae.py).

Per clip: `latent` = posterior mean, float16 [channels, frames]; `latent_std` = posterior std (for
sampling z = mean + std * eps in training), float16; meta["latent"] says which VAE, its rate, hop,
channels and frames, and how it ran. Clips of one length are encoded in one forward pass.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

from pipeline.stage import Reject, Resources, Row, Stage

AUDIO_RATE = 48000  # what decode/segment put in row["audio48"]
FP16_MAX = 65504.0


class VaeLatents(Stage):
    name = "vae_latents"
    consumes = ("audio48",)

    def __init__(self, config, context=None):
        super().__init__(config, context)
        cfg = config.vae_latents
        self.resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, pool_size=cfg.pool_size,
                                   batch_size=cfg.batch_size)
        self.vae = None

    @classmethod
    def prepare(cls, config) -> dict[str, str]:
        from model.vae import resolve_files

        config_file, checkpoint = resolve_files(config.vae_latents)
        return {"vae_latents.config_file": config_file, "vae_latents.checkpoint": checkpoint}

    def setup(self) -> None:
        from model.vae import AudioVAE, resolve_files

        cfg = self.config.vae_latents
        config_file, checkpoint = resolve_files(cfg)  # local paths once `prepare` has run
        self.vae = AudioVAE.load(config_file, checkpoint, cfg.preset, precision=cfg.precision)

    def _encode_group(self, rows: list[Row]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """One forward pass for rows of one shape; per row (mean, std) or why it failed. A batch
        that fails as a whole is retried row by row, so one bad clip cannot sink its neighbours."""
        try:
            audio = np.stack([np.asarray(r["audio48"], np.float32) for r in rows])
            mean, std = self.vae.encode(audio, AUDIO_RATE)
            return list(zip(mean, std))
        except Exception as exc:  # noqa: BLE001 - reported per row below
            if len(rows) == 1:
                return [f"{type(exc).__name__}: {exc}"]
        return [out for r in rows for out in self._encode_group([r])]

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        if self.vae is None:
            self.setup()
        results: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            audio = row.get("audio48")
            if audio is None or np.ndim(audio) != 2 or np.shape(audio)[-1] == 0:
                results[i] = f"audio48 missing or not [channels, samples]: shape {np.shape(audio) if audio is not None else None}"
            else:
                groups[np.shape(audio)].append(i)
        for idx in groups.values():
            results.update(zip(idx, self._encode_group([rows[i] for i in idx])))
        base = self.vae.describe()
        for i, row in enumerate(rows):
            out = results[i]
            if isinstance(out, tuple):
                mean, std = out
                worst = max(np.abs(mean).max(initial=0), std.max(initial=0))
                if not (np.isfinite(mean).all() and np.isfinite(std).all()):
                    out = f"non-finite latents ({int((~np.isfinite(mean)).sum())} of {mean.size} mean values)"
                elif worst >= FP16_MAX:
                    out = f"latent magnitude {worst:.3g} overflows float16"
            if isinstance(out, str):
                yield Reject.for_row(self.name, row, "vae_failed", f"{base['vae']} VAE: {out}")
                continue
            row["latent"], row["latent_std"] = mean.astype(np.float16), std.astype(np.float16)
            row["meta"]["latent"] = {**base, "frames": int(mean.shape[-1])}
            yield row
