"""Video-Robin training speed: optimizer steps/s and samples/s of the training step model/train.py runs
(model.loss forward, backward, grad clip, AdamW, EMA update) on synthetic batches of the loader's
shapes (64 latent channels x 256 frames, prompts of --text-tokens byte tokens), stage t2m.

    .venv/bin/python -m bench.train_speed                       # CPU: debug and base presets
    .venv/bin/python -m bench.train_speed --gpu                 # CUDA: base in bf16 autocast

GPU mode also reports tokens/s (LM tokens: text + one per latent patch) and MFU = achieved training
FLOP/s (model.flops_per_sample() x samples/s) / peak dense bf16 (H100 and H200 SXM: 989 TFLOP/s).
Writes bench/results/train_speed_<cpu|cuda>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from bench.record import save

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def synthetic_batch(cfg, batch: int, text_tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, cfg.max_frames, dtype=torch.bool)
    mask[:, :250] = True
    latent = torch.randn(batch, cfg.latent_channels, cfg.max_frames, generator=g) * mask[:, None]
    ids = torch.randint(32, 127, (batch, text_tokens), generator=g)
    return {"latent": latent.to(device), "latent_mask": mask.to(device), "text_ids": ids.to(device),
            "text_mask": torch.ones_like(ids, dtype=torch.bool).to(device), "keys": [str(i) for i in range(batch)]}


def measure(preset: str, batch: int, steps: int, warmup: int, budget_s: float, device, bf16: bool,
            text_tokens: int) -> dict:
    from model.config import preset as get_preset
    from model.ema import EMA
    from model.text import ByteTokenizer
    from model.train import LossModule, param_groups
    from model.video_robin import VideoRobin

    cfg = get_preset(preset, latent_channels=64)
    torch.manual_seed(0)
    model = VideoRobin(cfg, ByteTokenizer.vocab_size).to(device)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95))
    step_fn = LossModule(model).train()
    data = synthetic_batch(cfg, batch, text_tokens, device)
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step_fn(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model)
        return float(loss.detach())

    for _ in range(warmup):
        one()
    sync()
    times = []
    t_all = time.perf_counter()
    while len(times) < steps and (time.perf_counter() - t_all < budget_s or len(times) < 2):
        t0 = time.perf_counter()
        one()
        sync()
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    flops = model.flops_per_sample(text_tokens)
    out = {"preset": preset, "params_m": round(model.num_params() / 1e6, 2), "batch": batch, "timed_steps": len(times),
           "step_s": round(mean, 4), "steps_per_s": round(1 / mean, 3), "samples_per_s": round(batch / mean, 2),
           "lm_tokens_per_s": round(batch * (text_tokens + cfg.patches) / mean, 1),
           "latent_frames_per_s": round(batch * 250 / mean, 1), "flops_per_sample": flops,
           "achieved_tflops": round(flops * batch / mean / 1e12, 3), "precision": "bf16 autocast" if bf16 else "fp32"}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, base preset in bf16 (and fp32 for comparison)")
    ap.add_argument("--presets", default=None, help="comma list (CPU default: debug,base; GPU: base)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (CPU: debug 8, base 2; GPU 32)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps at most")
    ap.add_argument("--budget-s", type=float, default=25.0, help="stop timing a preset after this many seconds")
    ap.add_argument("--text-tokens", type=int, default=64)
    args = ap.parse_args()

    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available")
    presets = (args.presets or ("base" if args.gpu else "debug,base")).split(",")
    res = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "text_tokens": args.text_tokens,
           "load_avg_before": os.getloadavg()[0], "runs": []}
    if args.gpu:
        name = torch.cuda.get_device_name(device)
        res["gpu"] = name
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        res["peak_bf16_tflops"] = peak / 1e12 if peak else None
        torch.backends.cuda.matmul.allow_tf32 = True
    for p in presets:
        batch = args.batch or (32 if args.gpu else {"debug": 8}.get(p, 2))
        modes = [True, False] if args.gpu else [False]
        for bf16 in modes:
            if args.gpu:
                torch.cuda.reset_peak_memory_stats(device)
            run = measure(p, batch, args.steps, 2 if args.gpu else 1, args.budget_s, device, bf16, args.text_tokens)
            if args.gpu and res.get("peak_bf16_tflops") and bf16:
                run["mfu"] = round(run["achieved_tflops"] / res["peak_bf16_tflops"], 4)
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
    res["load_avg_after"] = os.getloadavg()[0]
    save(f"train_speed_{device.type}", res, report(res))


def report(res: dict) -> str:
    gpu = res["device"] == "cuda"
    lines = [f"# Video-Robin training speed on {res.get('gpu', 'CPU')} ({res['device']})", "",
             f"One training step of model/train.py (loss forward, backward, grad clip, AdamW, EMA) on synthetic "
             f"batches: 64 latent channels x 256 frames (250 real), {res['text_tokens']} text tokens, stage t2m. "
             f"torch {res['torch']}, {res['threads']} threads on {res['nproc']} cores. Mean of the timed steps after "
             "a warm-up. LM tokens = text tokens + one per 16-frame patch. Load average "
             f"{res['load_avg_before']:.1f} before, {res['load_avg_after']:.1f} after (the machine is shared).", "",
             "| preset | params M | precision | batch | steps/s | samples/s | LM tokens/s | latent frames/s | TFLOP/s |"
             + (" MFU | peak GiB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
    for r in res["runs"]:
        extra = f" {r.get('mfu', '-')} | {r.get('peak_mem_gib')} |" if gpu else ""
        lines.append(f"| {r['preset']} | {r['params_m']} | {r['precision']} | {r['batch']} | {r['steps_per_s']} | "
                     f"{r['samples_per_s']} | {r['lm_tokens_per_s']} | {r['latent_frames_per_s']} | "
                     f"{r['achieved_tflops']} |{extra}")
    if gpu and res.get("peak_bf16_tflops"):
        lines += ["", f"MFU against {res['peak_bf16_tflops']:.0f} TFLOP/s dense bf16; FLOPs per sample from "
                  "VideoRobin.flops_per_sample (6 x params x tokens + attention)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
