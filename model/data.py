"""The training stream: WebDataset shards -> batches for `VideoRobin.loss`.

One stream per (seed, rank, epoch): shards are resampled with replacement (`ResampledShards`,
deterministic), samples pass a shuffle buffer, one of each sample's prompts is drawn (or dropped to
"" with probability `p_drop_text`), and `with_epoch` cuts the endless stream to a fixed number of
batches, so every rank runs the same number of steps whatever its shards hold. The same (seed, rank,
epoch) always gives the same batches, also with DataLoader workers (each worker's stream is seeded
from its id too, and the DataLoader interleaves workers in a fixed order); so a resumed run rebuilds
the epoch's loader and skips the batches it already took.

Batch (tensors on the CPU):
  latent      float32 [B, C, T]  T = cfg.max_frames; zero-padded after the real frames, or cropped
  latent_mask bool    [B, T]     True on real frames
  text_ids    long    [B, L], text_mask bool [B, L]  (model.text.encode_batch)
  video       float32 [B, N, D], video_mask bool [B, N]  (cfg.use_video) N = cfg.video_len: the CLIP frame
              at each patch's centre time (video_tokens=patch) or every frame at video_fps ("frames")
  rhythm      float32 [B, 2, T]  (cfg.use_rhythm) the cut and motion rows of rhythm.npy
  keys list[str], texts list[str] (the prompts used), skipped int (samples dropped since the last batch)
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

RHYTHM_ROWS = (2, 3)  # rhythm.npy channels: onset, beat, cut, motion -> the visual ones
NO_LATENT = "run the pipeline with the vae_latents stage (and its VAE weights) to write latent.npy"
NO_CLIP = "run the pipeline with the clip_embed stage to write clip.npy"


def make_seed(*parts: int) -> int:
    """A 63-bit seed from integers (no Python string hashing: stable across processes)."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + (int(p) & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407) % (1 << 64)
        seed ^= seed >> 29
    return seed & ((1 << 63) - 1)


# -- shard lists ---------------------------------------------------------------------------------


def resolve_shards(spec: str) -> list[str]:
    """`--shards`: a pipeline OUT folder (-> OUT/shards/*.tar), a folder of tars, a glob, a brace
    pattern (`data/{000000..000009}.tar`), or URLs webdataset opens (`pipe:...`, `s3://...`,
    `https://...`), several separated by `::`."""
    import braceexpand

    urls: list[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        if "://" in part or part.startswith("pipe:"):
            urls.extend(braceexpand.braceexpand(part))
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            inner = path / "shards"
            urls.extend(sorted(str(p) for p in (inner if inner.is_dir() else path).glob("*.tar")))
            continue
        for expanded in braceexpand.braceexpand(str(path)):
            if any(c in expanded for c in "*?["):
                urls.extend(sorted(glob.glob(expanded)))
            elif Path(expanded).is_file():
                urls.append(expanded)
    # Hidden names are shards being written (shards/writer.py): never read them.
    urls = [u for u in urls if not os.path.basename(u).startswith(".")]
    if not urls:
        raise FileNotFoundError(f"--shards {spec!r} matches no shard: give a pipeline output folder, a folder of "
                                ".tar files, a glob, a brace pattern or URLs")
    return urls


def iter_raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Every sample of the shards in order, members as bytes."""
    import webdataset as wds

    yield from wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """An .npy member -> array (read-only, no copy). The first time a header is seen, `np.load(...,
    allow_pickle=False)` reads the array and so vets the header; later members with the very same
    header bytes (every sample of a dataset, nearly) are read with `np.frombuffer`, skipping numpy's
    header parsing, which costs more than the data on arrays this small."""
    header = None
    if data[:6] == b"\x93NUMPY" and len(data) > 12:
        start = 10 if data[6] == 1 else 12
        length = int.from_bytes(data[8:start], "little")
        header = bytes(data[:start + length])
        known = _NPY_HEADERS.get(header)
        if known is not None:
            dtype, shape, fortran, count = known
            array = np.frombuffer(data, dtype=dtype, count=count, offset=len(header))
            return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if header is not None and len(_NPY_HEADERS) < 1024 and not array.dtype.hasobject:
        _NPY_HEADERS[header] = (array.dtype, array.shape, bool(np.isfortran(array)) and array.ndim > 1, array.size)
    return array


@dataclass
class Geometry:
    """What the shards fix about the model: read from the first usable sample."""

    latent_channels: int
    latent_rate: float
    latent_frames: int
    latent: dict[str, Any]  # the sample json's `latent` section (vae, latent_hz, hop, channels, frames)
    clip_embed: dict[str, Any] | None  # its `clip_embed` section (model, dim, fps), None without CLIP
    clip_dim: int | None


def read_geometry(urls: list[str], need_clip: bool = False, max_samples: int = 10_000) -> Geometry:
    """The first sample with a latent (and CLIP frames, when `need_clip`) fixes the data geometry."""
    seen = with_latent = 0
    for sample in iter_raw_samples(urls):
        seen += 1
        meta = json.loads(sample["json"])
        if "latent.npy" in sample and meta.get("has_latent", True):
            with_latent += 1
            if not need_clip or "clip.npy" in sample:
                latent = load_npy(sample["latent.npy"])
                section = dict(meta.get("latent") or {})
                clip_dim = None
                if "clip.npy" in sample:
                    clip_dim = int(load_npy(sample["clip.npy"]).shape[1])
                rate = float(section.get("latent_hz") or section.get("rate") or 25.0)
                return Geometry(latent_channels=int(latent.shape[0]), latent_rate=rate,
                                latent_frames=int(latent.shape[1]), latent=section,
                                clip_embed=dict(meta["clip_embed"]) if meta.get("clip_embed") else None,
                                clip_dim=clip_dim)
        if seen >= max_samples:
            break
    if not with_latent:
        raise ValueError(f"none of the {seen} samples read from {len(urls)} shard(s) has a VAE latent: {NO_LATENT}")
    raise ValueError(f"none of the {with_latent} samples with a latent also has CLIP frames (stage v2m): {NO_CLIP}")


# -- one sample ----------------------------------------------------------------------------------


def fit_frames(array: np.ndarray, length: int) -> tuple[np.ndarray, int]:
    """[..., F] -> [..., length] float32: cropped from the start, or zero-padded at the end; and the
    number of real frames kept."""
    real = min(array.shape[-1], length)
    out = np.zeros((*array.shape[:-1], length), dtype=np.float32)
    out[..., :real] = array[..., :real]
    return out, real


def video_token_times(cfg: Any) -> np.ndarray:
    """Seconds into the clip of each video token: the centre of each latent patch ("patch"), or
    the centre of each video_fps frame ("frames")."""
    if cfg.video_tokens == "patch":
        return (np.arange(cfg.patches) + 0.5) * cfg.patch / cfg.latent_rate
    return (np.arange(cfg.video_len) + 0.5) / cfg.video_fps


def clip_frames_at(times: np.ndarray, clip_fps: float, clip_frames: int) -> np.ndarray:
    """The CLIP frame covering each time: round(t * clip_fps - 0.5), clipped to the frames there are
    (frame k covers [k, k+1) / fps)."""
    return np.clip(np.rint(times * clip_fps - 0.5), 0, clip_frames - 1).astype(np.int64)


def sample_row(sample: dict[str, Any], cfg: Any, rng: random.Random, p_drop_text: float) -> dict[str, Any] | None:
    """A raw sample -> arrays for one batch row; None when it lacks what the stage needs."""
    if "latent.npy" not in sample or "json" not in sample:
        return None
    meta = json.loads(sample["json"])
    if not meta.get("has_latent", True):
        return None
    if cfg.use_video and "clip.npy" not in sample:
        return None
    latent, real = fit_frames(load_npy(sample["latent.npy"]), cfg.max_frames)
    if latent.shape[0] != cfg.latent_channels:
        raise ValueError(f"sample {sample['__key__']}: latent has {latent.shape[0]} channels, "
                         f"the model {cfg.latent_channels} (shards from different VAEs?)")
    mask = np.zeros(cfg.max_frames, dtype=bool)
    mask[:real] = True
    prompts = [p for p in (meta.get("prompts") or {}).values() if p]
    text = rng.choice(prompts) if prompts else ""
    if rng.random() < p_drop_text:
        text = ""
    row: dict[str, Any] = {"key": sample["__key__"], "latent": latent, "latent_mask": mask, "text": text}
    if cfg.use_video:
        clip = load_npy(sample["clip.npy"])
        fps = float((meta.get("clip_embed") or {}).get("fps") or 1.0)
        times = video_token_times(cfg)
        row["video"] = clip[clip_frames_at(times, fps, len(clip))].astype(np.float32)
        if cfg.video_tokens == "patch":  # a patch is real when it holds a real latent frame
            row["video_mask"] = np.arange(cfg.patches) * cfg.patch < real
        else:  # a frame is real when it lies in the real latent frames and the clip has it
            row["video_mask"] = (times < real / cfg.latent_rate) & (np.arange(len(times)) < len(clip) * cfg.video_fps / fps)
    if cfg.use_rhythm:
        rows = list(RHYTHM_ROWS[: cfg.rhythm_channels])
        if "rhythm.npy" in sample:
            row["rhythm"], _ = fit_frames(load_npy(sample["rhythm.npy"])[rows], cfg.max_frames)
        else:
            row["rhythm"] = np.zeros((len(rows), cfg.max_frames), dtype=np.float32)
    return row


def collate(rows: list[dict[str, Any]], cfg: Any, tokenizer: Any, skipped: int) -> dict[str, Any]:
    from model.text import encode_batch

    texts = [r["text"] for r in rows]
    text_ids, text_mask = encode_batch(tokenizer, texts, cfg.text_max_tokens)
    batch: dict[str, Any] = {
        "latent": torch.from_numpy(np.stack([r["latent"] for r in rows])),
        "latent_mask": torch.from_numpy(np.stack([r["latent_mask"] for r in rows])),
        "text_ids": text_ids, "text_mask": text_mask,
        "keys": [r["key"] for r in rows], "texts": texts, "skipped": skipped,
    }
    if cfg.use_video:
        batch["video"] = torch.from_numpy(np.stack([r["video"] for r in rows]))
        batch["video_mask"] = torch.from_numpy(np.stack([r["video_mask"] for r in rows]))
    if cfg.use_rhythm:
        batch["rhythm"] = torch.from_numpy(np.stack([r["rhythm"] for r in rows]))
    return batch


NON_MODEL_KEYS = ("texts", "skipped")


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The model's view of a batch: tensors moved, the loader's bookkeeping left out."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items() if k not in NON_MODEL_KEYS}


# -- the stream ----------------------------------------------------------------------------------


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


class _TarSamples:
    """Pipeline stage: shard urls -> samples holding only the members a batch needs (json, latent.npy,
    and clip.npy / rhythm.npy when used). Local shards are opened seekable, so the members left out
    (the FLAC audio, the thumbnail, latent_std.npy) are seeked over, not read; remote ones stream
    through webdataset's own tar reader with the same member selection."""

    def __init__(self, wanted: set[str]):
        self.wanted = wanted

    def select(self, fname: str) -> bool:
        return fname.rpartition("/")[2].partition(".")[2] in self.wanted

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        import tarfile

        import webdataset as wds

        empty = 0  # consecutive shards without a sample: an endless resampled stream of empty shards
        for item in src:
            if empty > 1000:
                raise ValueError(f"the last {empty} shards read held no sample (last: {item['url']})")
            empty += 1
            url = item["url"]
            if not _is_local(url):
                for sample in wds.tarfile_to_samples(select_files=self.select)(iter([item])):
                    empty = 0
                    yield sample
                continue
            sample: dict[str, Any] = {}
            with open(url, "rb") as f:
                members = ustar_members(f)
                if members is None:  # pax / GNU headers: Python's reader knows them all
                    f.seek(0)
                    with tarfile.open(fileobj=f, mode="r:") as tar:
                        members = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
                for path, offset, size in members:
                    head, _, name = path.rpartition("/")
                    key, _, ext = name.partition(".")
                    key = f"{head}/{key}" if head else key
                    if sample.get("__key__") != key:  # members of a sample are adjacent (the writer's rule)
                        if len(sample) > 2:
                            empty = 0
                            yield sample
                        sample = {"__key__": key, "__url__": url}
                    if ext in self.wanted:
                        f.seek(offset)
                        sample[ext] = f.read(size)
            if len(sample) > 2:
                empty = 0
                yield sample


def ustar_members(f) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files of a plain ustar/v7 tar (what webdataset's
    TarWriter writes), from the 512-byte headers alone, seeking over the data; None when the file
    holds anything else (pax or GNU long-name headers, base-256 sizes, a bad checksum)."""
    out = []
    pos = 0
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512 or header.count(0) == 512:
            return out
        kind = header[156:157]
        raw_size = header[124:136]
        if kind not in (b"0", b"\0", b"5") or raw_size[0] & 0x80:
            return None
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
            return None
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
            name = f"{prefix}/{name}" if prefix else name
        if kind != b"5":
            out.append((name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512


class _Batches:
    """Pipeline stage: raw samples -> shuffled, decoded, batched rows. Its RNG is made when iteration
    starts, inside the DataLoader worker, from (seed, rank, epoch, worker)."""

    def __init__(self, cfg: Any, batch_size: int, seed: int, rank: int, epoch: int, shuffle_buffer: int,
                 p_drop_text: float):
        self.cfg, self.batch_size, self.shuffle_buffer, self.p_drop_text = cfg, batch_size, shuffle_buffer, p_drop_text
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self._tokenizer = None

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from model.text import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg)
        rng = random.Random(make_seed(self.seed, self.rank, self.epoch, _worker_id(), 2))
        buffer: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        skipped = 0
        for sample in src:
            row = sample_row(sample, self.cfg, rng, self.p_drop_text)
            if row is None:
                skipped += 1
                if skipped > 100_000 and not rows and not buffer:
                    raise ValueError(f"{skipped} samples in a row lack what stage needs: {NO_LATENT}"
                                     + (f"; {NO_CLIP}" if self.cfg.use_video else ""))
                continue
            buffer.append(row)
            if len(buffer) < self.shuffle_buffer:
                continue
            rows.append(buffer.pop(rng.randrange(len(buffer))))
            if len(rows) == self.batch_size:
                yield collate(rows, self.cfg, self._tokenizer, skipped)
                rows, skipped = [], 0


def make_pipeline(urls: list[str], cfg: Any, *, batch_size: int, seed: int, rank: int, epoch: int, batches: int,
                  shuffle_buffer: int = 64, p_drop_text: float | None = None, num_workers: int = 0):
    """The WebDataset pipeline of one (seed, rank, epoch): `batches` batches in all (split over
    `num_workers` DataLoader workers, each running its own copy)."""
    import webdataset as wds

    per_worker = math.ceil(batches / max(1, num_workers))
    shards = wds.ResampledShards(urls, seed=make_seed(seed, rank, epoch, 1) & 0x7FFFFFFF,
                                 worker_seed=_worker_id, deterministic=True)
    p = cfg.p_drop_text if p_drop_text is None else p_drop_text
    stage = _Batches(cfg, batch_size, seed, rank, epoch, max(1, shuffle_buffer), p)
    wanted = {"json", "latent.npy"} | ({"clip.npy"} if cfg.use_video else set()) | ({"rhythm.npy"} if cfg.use_rhythm else set())
    return wds.DataPipeline(shards, _TarSamples(wanted), stage).with_epoch(per_worker)


def epoch_batches(urls: list[str], cfg: Any, *, batch_size: int, seed: int, rank: int, epoch: int, batches: int,
                  skip: int = 0, num_workers: int = 0, shuffle_buffer: int = 64,
                  p_drop_text: float | None = None, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Exactly `batches - skip` batches: the epoch's stream from batch `skip` on (a resumed run skips
    the batches it trained on before it stopped)."""
    pipeline = make_pipeline(urls, cfg, batch_size=batch_size, seed=seed, rank=rank, epoch=epoch, batches=batches,
                             shuffle_buffer=shuffle_buffer, p_drop_text=p_drop_text, num_workers=num_workers)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                             prefetch_factor=4, persistent_workers=False, in_order=True,
                                             pin_memory=pin_memory)
    else:
        loader = pipeline
    taken = 0
    for batch in islice(iter(loader), skip, batches):
        taken += 1
        yield batch
    if taken != batches - skip:
        raise RuntimeError(f"the loader ended after {skip + taken} of {batches} batches")


def latent_stats(urls: list[str], cfg: Any, *, seed: int, batches: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the real latent frames of the first `batches` batches of a stream
    that no rank trains on (rank -1), so every rank computes the same numbers."""
    total = torch.zeros(cfg.latent_channels, dtype=torch.float64)
    square = torch.zeros_like(total)
    count = 0
    for batch in epoch_batches(urls, cfg, batch_size=batch_size, seed=seed, rank=-1, epoch=0, batches=batches,
                               p_drop_text=0.0):
        mask = batch["latent_mask"][:, None, :].double()
        x = batch["latent"].double() * mask
        total += x.sum(dim=(0, 2))
        square += (x * x).sum(dim=(0, 2))
        count += int(mask.sum())
    mean = total / max(count, 1)
    std = (square / max(count, 1) - mean * mean).clamp_min(1e-8).sqrt()
    return mean.float(), std.float()
