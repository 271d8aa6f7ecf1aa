"""`export-sat DEST`: the selected samples in stable-audio-tools' `pre_encoded` layout.

stable-audio-tools 0.0.19 (`data/dataset.py`, PreEncodedDataset) lists `*.npy` under a dataset
path (or the paths in its `filelist.txt`), loads each as the latent `[C, T]`, and reads the `.json`
beside it: `padding_mask` (one 0/1 per latent frame; it crops with it), `seconds_total` (min/max
length filters), plus whatever the conditioners ask for: here `prompt`, `seconds_start`,
`seconds_total`. So we write, per sample, DEST/<shard>/<key>.npy and DEST/<shard>/<key>.json, then
DEST/filelist.txt and DEST/dataset_config.json (`"dataset_type": "pre_encoded"`) to point its
trainer at. Tars are read once each, only the latent members of selected rows."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from shards.browse.query import filtered
from shards.index import Out, progress_bar

COLUMNS = ["key", "shard", "duration_s", "prompt", "prompts", "members", "source_path", "start_s",
           "tempo_bpm", "key_name", "moods", "genres", "instruments", "vae_model", "latent_frames"]


def pick_prompt(row: dict, level: str | None) -> tuple[str | None, bool]:
    """(prompt, fell_back): the named level when it is there, else the index's full prompt."""
    if level:
        for p in row.get("prompts") or []:
            if p["level"] == level:
                return p["text"], False
        return row.get("prompt"), True
    return row.get("prompt"), False


def sample_json(row: dict, latent: np.ndarray, level: str | None) -> tuple[dict, bool]:
    prompt, fell_back = pick_prompt(row, level)
    frames = int(latent.shape[-1])
    return {
        "prompt": prompt or "",
        "seconds_start": 0.0,  # the latent covers the clip from its first frame
        "seconds_total": float(row["duration_s"]),
        "padding_mask": [1] * frames,
        "key": row["key"],
        "source_path": row["source_path"],
        "clip_start_s": row["start_s"],
        "tempo_bpm": row["tempo_bpm"],
        "key_name": row["key_name"],
        "moods": row["moods"],
        "genres": row["genres"],
        "instruments": row["instruments"],
        "prompts": {p["level"]: p["text"] for p in row.get("prompts") or []},
        "vae_model": row["vae_model"],
    }, fell_back


def _latents(out: Out, shard: str, keys: set[str]):
    """(key, latent bytes) for `keys`, streaming the tar once."""
    with out.fs.open(out.path("shards", shard), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            if member == "latent.npy" and key in keys:
                yield key, tar.extractfile(info).read()


def run(out: Out, dest: str, where: str | None, level: str | None, dtype: str, progress: bool) -> dict:
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    files = out.index_files()
    written, skipped, fallbacks, listing = 0, 0, 0, []
    bar = progress_bar(len(files), "export-sat", "shard", progress)
    for index_file in files:
        rows = {}  # one index file (= one shard) at a time: memory is bounded by a shard
        for batch in filtered(out, where, COLUMNS, files=[index_file]):
            for row in batch.to_pylist():
                if "latent.npy" in (row["members"] or []):
                    rows[row["key"]] = row
                else:
                    skipped += 1
        bar.update(1)
        if not rows:
            continue
        shard = next(iter(rows.values()))["shard"]
        shard_dir = folder / shard.removesuffix(".tar")
        shard_dir.mkdir(exist_ok=True)
        for key, blob in _latents(out, shard, set(rows)):
            latent = np.load(io.BytesIO(blob), allow_pickle=False).astype(dtype)
            meta, fell_back = sample_json(rows[key], latent, level)
            fallbacks += fell_back
            np.save(shard_dir / f"{key}.npy", latent, allow_pickle=False)
            (shard_dir / f"{key}.json").write_text(json.dumps(meta, ensure_ascii=False))
            listing.append(f"{shard_dir.name}/{key}.npy")
            written += 1
    bar.close()
    tmp = folder / ".filelist.txt.tmp"
    tmp.write_text("".join(f"{p}\n" for p in listing))
    os.replace(tmp, folder / "filelist.txt")
    config = {"dataset_type": "pre_encoded", "datasets": [{"id": "video-robin", "path": str(folder.resolve())}],
              "random_crop": True}
    (folder / "dataset_config.json").write_text(json.dumps(config, indent=2))
    return {"written": written, "skipped_without_latent": skipped, "prompt_level_fallbacks": fallbacks, "dest": str(folder)}
