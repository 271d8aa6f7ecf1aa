"""`export KEY OUTDIR`: one sample's members as ordinary files: KEY.flac (or KEY.wav decoded from
its latent with --from-latent), KEY.jpg, KEY.json and KEY.<name>.npy for each array."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from shards.browse.show import lookup
from shards.index import Out


def check_npy(data: bytes, name: str) -> np.ndarray:
    """Arrays leave only as plain numeric .npy: anything that needs pickle is refused."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"member {name} is not a plain .npy array: {exc}") from None


def decode_latent(latent: np.ndarray, config_file: str, checkpoint: str, preset: str) -> tuple[np.ndarray, int]:
    from model.vae import AudioVAE

    vae = AudioVAE.load(config_file, checkpoint, preset)
    audio = vae.decode(latent.astype(np.float32)[None])[0]  # [channels, samples]
    return audio, vae.sample_rate


def run(out: Out, key: str, dest: str, from_latent: bool = False, vae_config: str | None = None,
        vae_checkpoint: str | None = None, vae_preset: str | None = None) -> list[Path]:
    row = lookup(out, key)
    members = list(row.get("members") or [])
    if from_latent:
        if "latent.npy" not in members:
            raise ValueError(f"sample {key} has no latent.npy (has_latent is false); export its flac instead")
        if not (vae_config and vae_checkpoint and vae_preset):
            raise ValueError("--from-latent needs --vae-config, --vae-checkpoint and --vae-preset")
    data = out.read_members(row["shard"], key, members)
    missing = sorted(set(members) - set(data))
    if missing:
        raise ValueError(f"shard {row['shard']} lacks member(s) {', '.join(missing)} of {key} (run verify)")
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, blob in sorted(data.items()):
        if name.endswith(".npy"):
            check_npy(blob, name)
        if name == "flac" and from_latent:
            continue
        path = folder / f"{key}.{name}"
        path.write_bytes(blob)
        written.append(path)
    if from_latent:
        import soundfile as sf

        audio, rate = decode_latent(check_npy(data["latent.npy"], "latent.npy"), vae_config, vae_checkpoint, vae_preset)
        path = folder / f"{key}.wav"
        sf.write(path, np.clip(audio.T, -1.0, 1.0), rate, subtype="PCM_16")
        written.append(path)
    return written
