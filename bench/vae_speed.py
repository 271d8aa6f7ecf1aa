"""Music VAE speed: audio seconds encoded (and decoded) per wall second by the vae_latents model.

    .venv/bin/python -m bench.vae_speed [--preset songbloom] [--seconds 10] [--batch 4] [--device auto]

The model is diffusers' AutoencoderOobleck with the preset's real geometry (SongBloom: 48 kHz,
strides [2,4,4,6,10], 128 channels x [1,2,4,8,16], 64 latents; 169M parameters) and RANDOM
weights, run exactly as the stage runs it (model/vae.py: weight norm folded, inference mode):
speed does not depend on the weights' values.
  cpu   fp32 (what `precision: auto` picks on CPU) at --batch clips of --seconds.
  cuda  bf16 and fp32 at batch 1, 4, 16 (and --batch), per-GPU real-time factor, peak memory.
Baseline, in the same run: resampling the same audio 48 -> 44.1 kHz with scipy (resample_poly,
what AudioVAE does for a 44.1 kHz VAE) on CPU; on a GPU also the fp32 CPU encode of one clip.
Writes bench/results/vae_speed_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from bench.record import save
from model.oobleck import OobleckSpec, get_preset

# The released configs' widths (not part of the preset geometry, which the files are checked against).
WIDTHS = {"songbloom": (128, (1, 2, 4, 8, 16)), "stable_audio_open": (128, (1, 2, 4, 8, 16)), "tiny": (16, (1, 2, 2, 4, 4))}


def random_vae(preset: str, device, precision: str):
    import torch

    from model.vae import AudioVAE, new_model

    p = get_preset(preset)
    channels, mults = WIDTHS[preset]
    spec = OobleckSpec(sample_rate=p.sample_rate, strides=p.strides, channels=channels, c_mults=mults,
                       decoder_channels=channels, latent_dim=p.latent_dim, audio_channels=p.audio_channels,
                       final_tanh=False, embedded=False)
    torch.manual_seed(0)
    model = new_model(spec)
    params = sum(t.numel() for t in model.parameters())
    return AudioVAE.from_model(model, spec, p, device, precision, checkpoint="random weights"), params


def clips(batch: int, seconds: float, rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    tone = np.sin(2 * np.pi * 220 * t)[None, None] * rng.uniform(0.2, 0.5, (batch, 2, 1))
    return (tone + 0.05 * rng.standard_normal((batch, 2, len(t)))).astype(np.float32)


def timed(fn, repeat: int, sync=lambda: None) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, kernels, first-touch
    sync()
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
    return min(walls), walls


def measure(vae, batch: int, seconds: float, repeat: int, sync) -> dict:
    audio = clips(batch, seconds)
    mean, _ = vae.encode(audio)
    enc, enc_all = timed(lambda: vae.encode(audio), repeat, sync)
    dec, dec_all = timed(lambda: vae.decode(mean), repeat, sync)
    total = batch * seconds
    return {"batch": batch, "seconds": seconds, "frames": int(mean.shape[-1]), "encode_s": round(enc, 4),
            "decode_s": round(dec, 4), "encode_x_realtime": round(total / enc, 3), "decode_x_realtime": round(total / dec, 3),
            "encode_walls": [round(w, 4) for w in enc_all], "decode_walls": [round(w, 4) for w in dec_all]}


def resample_baseline(batch: int, seconds: float, repeat: int) -> dict:
    from scipy.signal import resample_poly

    audio = clips(batch, seconds)
    wall, _ = timed(lambda: resample_poly(audio, 147, 160, axis=-1), repeat)
    return {"what": "scipy resample_poly 48 -> 44.1 kHz, same audio, CPU", "wall_s": round(wall, 4),
            "x_realtime": round(batch * seconds / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="songbloom")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=2, help="timed calls after one warm-up; the fastest is kept")
    args = ap.parse_args()

    import torch

    from pipeline.devices import torch_device

    device = torch_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    res = {"preset": args.preset, "device": device.type, "weights": "random (speed only; same geometry as the release)",
           "threads": torch.get_num_threads(), "nproc": len(os.sched_getaffinity(0)), "platform": platform.platform(),
           "torch": torch.__version__, "baseline": resample_baseline(args.batch, args.seconds, args.repeat), "runs": []}
    if device.type == "cpu":
        vae, res["parameters"] = random_vae(args.preset, device, "fp32")
        res["runs"].append({"precision": "fp32", **measure(vae, args.batch, args.seconds, args.repeat, lambda: None)})
    else:
        res["gpu"] = torch.cuda.get_device_name(device)
        cpu_vae, res["parameters"] = random_vae(args.preset, torch.device("cpu"), "fp32")
        one = measure(cpu_vae, 1, min(args.seconds, 5.0), 1, lambda: None)
        res["baseline_cpu_fp32"] = {k: one[k] for k in ("batch", "seconds", "encode_s", "encode_x_realtime", "decode_x_realtime")}
        del cpu_vae
        for precision in ("bf16", "fp32"):
            vae, _ = random_vae(args.preset, device, precision)
            for batch in sorted({1, 4, 16, args.batch}):
                torch.cuda.reset_peak_memory_stats(device)
                run = measure(vae, batch, args.seconds, args.repeat, lambda: torch.cuda.synchronize(device))
                run["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                run["encode_over_cpu_fp32"] = round(run["encode_x_realtime"] / one["encode_x_realtime"], 1)
                res["runs"].append({"precision": precision, **run})
            del vae
            torch.cuda.empty_cache()
    save(f"vae_speed_{device.type}", res, report(res))


def report(res: dict) -> str:
    lines = [f"# VAE speed: {res['preset']} on {res.get('gpu', 'CPU')} ({res['device']})", "",
             f"diffusers AutoencoderOobleck, {res.get('parameters', 0) / 1e6:.0f}M parameters, **{res['weights']}**; "
             f"torch {res['torch']}, {res['threads']} threads on {res['nproc']} cores. "
             "x real time = audio seconds per wall second (fastest of the timed calls after a warm-up).", "",
             "| precision | batch | clip s | encode s | encode x real time | decode s | decode x real time |"
             + (" peak GiB | encode / CPU fp32 |" if res["device"] == "cuda" else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if res["device"] == "cuda" else "")]
    for r in res["runs"]:
        extra = f" {r['peak_mem_gib']} | {r['encode_over_cpu_fp32']} |" if res["device"] == "cuda" else ""
        lines.append(f"| {r['precision']} | {r['batch']} | {r['seconds']:g} | {r['encode_s']} | {r['encode_x_realtime']} | "
                     f"{r['decode_s']} | {r['decode_x_realtime']} |{extra}")
    b = res["baseline"]
    lines += ["", f"Baseline, same run: {b['what']}: {b['x_realtime']} x real time ({b['wall_s']} s)."]
    if "baseline_cpu_fp32" in res:
        c = res["baseline_cpu_fp32"]
        lines.append(f"CPU fp32 (1 clip of {c['seconds']:g} s): encode {c['encode_x_realtime']} x real time, "
                     f"decode {c['decode_x_realtime']} x real time.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
