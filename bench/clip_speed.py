"""CLIP frame-embedding speed of the clip_embed stage's code path (stages/clip_model.py).

    .venv/bin/python -m bench.clip_speed [--model ViT-B-32] [--frames 256] [--batch 64] [--device auto]

Models are open_clip architectures with RANDOM weights (nothing is downloaded): speed does not depend
on the weights, but no output of this benchmark means anything beyond speed.
  cpu   baseline: the tensor preprocessing alone (uint8 224 px frames -> normalised input);
        then preprocessing + image tower in fp32 (encode_frames, `--batch` frames per forward),
        as frames/s and as a multiple of the baseline; and the one-time text-tower cost of the
        tag vocabulary (timed on a sample of its prompts, scaled to all of them).
  cuda  for ViT-B-32 and ViT-L-14 (and --model) at a few batch sizes: fp32 (the baseline), bf16 and
        fp16 frames/s and their speed-up over fp32 at the same batch size, uint8 frames sent from
        host memory each time (as the stage does); plus the preprocessing alone and peak memory.
Writes bench/results/clip_speed_<device>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from stages import clip_model

RESULTS = Path(__file__).resolve().parent / "results"
GPU_MODELS = ("ViT-B-32", "ViT-L-14")
GPU_BATCHES = (32, 128, 256)
NOTE = "Random weights (open_clip architecture, no checkpoint): speed only; embeddings and tags are meaningless."


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device, reps: int) -> float:
    """Fastest of `reps` timed calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def random_model(name: str, device, dtype):
    import open_clip

    return open_clip.create_model(name, pretrained=None, device="cpu").to(device=device, dtype=dtype).eval()


def test_frames(n: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def preprocess_fps(model, frames: np.ndarray, device, batch: int, reps: int) -> float:
    def run():
        with torch.inference_mode():
            for i in range(0, len(frames), batch):
                clip_model.preprocess(torch.from_numpy(frames[i : i + batch]).to(device), model)
    return len(frames) / best_of(run, device, reps)


def encode_fps(model, frames: np.ndarray, device, dtype, batch: int, reps: int) -> float:
    return len(frames) / best_of(lambda: clip_model.encode_frames(model, frames, device, dtype, chunk=batch), device, reps)


def bench_cpu(args) -> dict:
    device, dtype = torch.device("cpu"), torch.float32
    model = random_model(args.model, device, dtype)
    frames = test_frames(args.frames)
    pre = preprocess_fps(model, frames, device, args.batch, reps=3)
    enc = encode_fps(model, frames, device, dtype, args.batch, reps=args.reps)
    vocab = clip_model.load_vocabulary("visual_tags.v1")
    prompts = [t.format(tag) for tags in vocab["categories"].values() for tag in tags for t in vocab["templates"]]
    import open_clip

    tokenizer = open_clip.get_tokenizer(args.model)
    sample = prompts[: args.text_sample]
    with torch.inference_mode():
        t_text = best_of(lambda: model.encode_text(tokenizer(sample)), device, reps=1)
    return {"model": args.model, "frames": args.frames, "batch": args.batch, "threads": torch.get_num_threads(),
            "preprocess_fps": round(pre, 1), "encode_fps_fp32": round(enc, 2),
            "encode_over_preprocess_time": round(pre / enc, 1),
            "clips_per_s": round(enc / 40, 3),  # 10 s clips at 4 fps = 40 frames
            "text_prompts": len(prompts), "text_prompts_timed": len(sample),
            "text_setup_s_estimate": round(t_text * len(prompts) / len(sample), 1)}


def bench_cuda(args) -> dict:
    from pipeline.devices import torch_device

    device = torch_device()
    models = list(dict.fromkeys([*GPU_MODELS, args.model]))
    frames = test_frames(max(GPU_BATCHES) * 4)
    rows = []
    for name in models:
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            torch.cuda.empty_cache()
            model = random_model(name, device, dtype)
            for batch in GPU_BATCHES:
                torch.cuda.reset_peak_memory_stats()
                fps = encode_fps(model, frames, device, dtype, batch, reps=args.reps)
                rows.append({"model": name, "dtype": dname, "batch": batch, "fps": round(fps, 1),
                             "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            if dname == "fp32":
                rows.append({"model": name, "dtype": "preprocess only", "batch": 256,
                             "fps": round(preprocess_fps(model, frames, device, 256, reps=3), 1), "peak_gib": None})
            del model
    base = {(r["model"], r["batch"]): r["fps"] for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        if (r["model"], r["batch"]) in base and r["dtype"] != "preprocess only":
            r["speedup_over_fp32"] = round(r["fps"] / base[(r["model"], r["batch"])], 2)
    return {"gpu": torch.cuda.get_device_name(0), "rows": rows}


def write(device: str, result: dict, args) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = {"device": device, "date": stamp, "note": NOTE, "torch": torch.__version__,
              "platform": platform.platform(), "nproc": len(os.sched_getaffinity(0)), **result}
    (RESULTS / f"clip_speed_{device}.json").write_text(json.dumps(result, indent=2))
    sizes = f" --frames {args.frames} --batch {args.batch}" if device == "cpu" else ""
    lines = [f"# CLIP frame embedding speed ({device})", "",
             f"`python -m bench.clip_speed --model {args.model}{sizes} --device {device}`", "",
             f"{NOTE} {stamp}; torch {torch.__version__}; {result['nproc']} cores; "
             f"load average before/after {result['load_before']}/{result['load_after']}.", ""]
    if device == "cpu":
        c = result["cpu"]
        lines += ["| measure | value |", "|---|---|",
                  f"| baseline: tensor preprocessing alone ({c['frames']} frames, 224 px) | {c['preprocess_fps']} frames/s |",
                  f"| {c['model']} fp32, preprocessing + image tower, batch {c['batch']}, {c['threads']} threads | {c['encode_fps_fp32']} frames/s |",
                  f"| embedding time / preprocessing time | {c['encode_over_preprocess_time']}x |",
                  f"| 10 s clips (40 frames) per second | {c['clips_per_s']} |",
                  f"| one-time tag text embeddings ({c['text_prompts']} prompts; {c['text_prompts_timed']} timed, scaled) | {c['text_setup_s_estimate']} s |"]
    else:
        lines += [f"GPU: {result['gpu']}", "", "| model | dtype | batch | frames/s | x fp32 | peak GiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['fps']} | {r.get('speedup_over_fp32', '')} | {r['peak_gib'] or ''} |"
                  for r in result["rows"]]
    path = RESULTS / f"clip_speed_{device}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--text-sample", type=int, default=48, help="prompts timed for the text-tower estimate (CPU)")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(NOTE)
    load_before = round(os.getloadavg()[0], 2)
    result = {"cpu": bench_cpu(args)} if device == "cpu" else bench_cuda(args)
    result.update(load_before=load_before, load_after=round(os.getloadavg()[0], 2))
    path = write(device, result, args)
    print(path.read_text())


if __name__ == "__main__":
    main()
