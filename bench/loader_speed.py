"""Training loader speed: samples/s of model/data.py (resampled WebDataset stream, shuffle buffer, npy
decode, prompt draw, CLIP alignment, tokenisation, collate) against raw reading of the same shards
(tarfile, every member's bytes read) in the same run.

    .venv/bin/python -m bench.loader_speed [--shards N] [--per-shard M] [--audio]

Shards are synthesised with the pipeline's own writer (shards/writer.py: encode_sample + ShardSink)
at the real geometry: latent.npy and latent_std.npy [64, 250] float16, clip.npy [40, 768] float16
(ViT-L/14 at 4 fps), rhythm.npy [4, 250], the json with four prompt levels; `--audio` adds the 10 s
48 kHz stereo FLAC the pipeline writes by default (the loader reads it but does not decode it).
Both readers see the files from the page cache (they were just written). Stage v2m (video on), batch 16.
Writes bench/results/loader_speed_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.record import save



def synth_shards(out: Path, shards: int, per_shard: int, audio: bool) -> list[str]:
    from pipeline.ownership import claim
    from pipeline.storage import Storage
    from shards.media import encode_media
    from shards.writer import ShardSink, encode_sample, parquet_file

    rng = np.random.default_rng(0)
    storage = Storage(str(out))
    storage.makedirs("shards", "index")
    claim(storage, "bench")
    for s in range(shards):
        sink = ShardSink(storage, "bench")
        for i in range(per_shard):
            key = f"{s:08x}_{i:08d}"
            meta = {"source": {"source_id": f"{s:08x}", "path": f"/videos/{s}.mp4"}, "probe": {"duration": 60.0},
                    "clip": {"index": i, "start": 10.0 * i, "end": 10.0 * i + 10, "duration": 10.0, "cut_times": [],
                             "shots": [], "decoder": "pyav", "is_last": False},
                    "latent": {"vae": "songbloom", "latent_hz": 25.0, "channels": 64, "frames": 250},
                    "clip_embed": {"model": "ViT-L-14", "dim": 768, "fps": 4.0, "frames": 40},
                    "prompts": {"minimal": "calm piano", "tempo_key": "calm piano at 80 BPM in C major",
                                "harmony": "calm piano at 80 BPM in C major, chords C-F-G-C",
                                "video": "calm piano at 80 BPM in C major, chords C-F-G-C, scoring a slow video"}}
            row = {"key": key, "meta": meta,
                   "latent": rng.standard_normal((64, 250)).astype(np.float16),
                   "latent_std": rng.random((64, 250)).astype(np.float16),
                   "clip_embeddings": rng.standard_normal((40, 768)).astype(np.float16),
                   "rhythm": rng.random((4, 250)).astype(np.float16)}
            if audio:
                encode_media(row, (0.1 * rng.standard_normal((2, 480000))).astype(np.float32), None, True, False)
            sink.add(key, encode_sample(row), meta)
        name, table = sink.finish()  # the tar, under a name derived from its keys
        parquet_file(storage, f"index/{name}.parquet", table)  # its index file: the commit point
    return sorted(str(p) for p in (out / "shards").glob("*.tar"))


def raw_read(urls: list[str], passes: int = 1) -> tuple[int, int, float]:
    """tarfile, every member read, `passes` times over the shards: (samples, bytes, seconds)."""
    t0 = time.perf_counter()
    samples, size = [], 0
    for url in urls * passes:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile():
                    size += len(tar.extractfile(member).read())
                    key = member.name.split(".", 1)[0]
                    if not samples or samples[-1] != key:
                        samples.append(key)
    return len(samples), size, time.perf_counter() - t0


def loader_read(urls: list[str], samples: int, batch: int, workers: int) -> tuple[int, float]:
    from model.config import preset
    from model.data import epoch_batches

    cfg = preset("base", latent_channels=64, clip_dim=768, use_video=True)
    batches = max(1, samples // batch)
    t0 = time.perf_counter()
    n = 0
    for b in epoch_batches(urls, cfg, batch_size=batch, seed=0, rank=0, epoch=0, batches=batches,
                           num_workers=workers, shuffle_buffer=64):
        n += len(b["keys"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--audio", action="store_true", help="also write and read the FLAC member")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to time")
    ap.add_argument("--passes", type=int, default=3, help="each reader reads this many times the shards' samples")
    ap.add_argument("--keep", default=None, help="write the shards here and keep them (default: a temp dir)")
    args = ap.parse_args()

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loader-bench-"))
    res = {"nproc": os.cpu_count(), "load_avg_before": os.getloadavg()[0],
           "machine": platform.processor() or platform.machine(), "shards": args.shards, "per_shard": args.per_shard,
           "batch": args.batch, "audio": args.audio, "passes": args.passes, "runs": []}
    try:
        t0 = time.perf_counter()
        urls = synth_shards(out, args.shards, args.per_shard, args.audio)
        res["write_s"] = round(time.perf_counter() - t0, 1)
        res["total_mb"] = round(sum(os.path.getsize(u) for u in urls) / 1e6, 1)
        raw_read(urls)  # warm the page cache for both readers
        n, size, dt = raw_read(urls, args.passes)
        raw = n / dt
        res["raw"] = {"samples": n, "mb": round(size / 1e6, 1), "s": round(dt, 3), "samples_per_s": round(raw, 1),
                      "mb_per_s": round(size / 1e6 / dt, 1)}
        for w in (int(x) for x in args.workers.split(",")):
            m, dt = loader_read(urls, n, args.batch, w)
            res["runs"].append({"workers": w, "samples": m, "s": round(dt, 3), "samples_per_s": round(m / dt, 1),
                                "ratio_vs_raw": round(m / dt / raw, 3)})
            print(json.dumps(res["runs"][-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    res["load_avg_after"] = os.getloadavg()[0]
    save("loader_speed_cpu_audio" if args.audio else "loader_speed_cpu", res, report(res))


def report(res: dict) -> str:
    r = res["raw"]
    lines = [f"# Training loader vs raw tar reading ({'with' if res['audio'] else 'without'} the FLAC member)", "",
             f"{res['shards']} shards x {res['per_shard']} samples ({res['total_mb']} MB) written by shards/writer.py at "
             "the real geometry (latent [64, 250], CLIP [40, 768] float16, rhythm, json with 4 prompts"
             f"{', 10 s stereo FLAC' if res['audio'] else ''}). Loader: model/data.py, stage v2m, batch {res['batch']}, "
             f"resampled shards, shuffle buffer 64. Raw: tarfile, every member's bytes read. Each reads {res['passes']} x the "
             "samples there are, once, after a warm-up read; the page cache is warm for both. "
             f"{res['nproc']} cores, load average {res['load_avg_before']:.1f} before, {res['load_avg_after']:.1f} after "
             "(the machine is shared).", "",
             f"Raw tar reading: {r['samples_per_s']} samples/s ({r['mb_per_s']} MB/s).", "",
             "| DataLoader workers | samples | seconds | samples/s | loader / raw |", "|---|---|---|---|---|"]
    for x in res["runs"]:
        lines.append(f"| {x['workers']} | {x['samples']} | {x['s']} | {x['samples_per_s']} | {x['ratio_vs_raw']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
