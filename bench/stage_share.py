"""Where the end-to-end demo's time goes once the model stages run: each stage's share.

    .venv/bin/python -m bench.stage_share [--videos 6] [--seconds 24] [--vae songbloom]

Runs the demo's input (6 synthetic 24 s videos, as `make demo` makes them) through the whole
pipeline in the single-process loop (every second is attributed to exactly one stage) with
RANDOM-weight models of the real architectures: open_clip ViT-B-32 (the local preset's CLIP) and
the SongBloom VAE geometry (169M parameters) in stable-audio-tools' checkpoint layout, loaded
through the same code as real weights. Speed does not depend on the weights' values; the
features are meaningless, which is why only benchmarks do this. A second run with the model stages
skipped gives the baseline in the same session: the CPU-only pipeline of the demo.
Writes bench/results/stage_share_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.pipeline_throughput import RESULTS, ROOT, git, machine, make_inputs

WORK = ROOT / "work" / "stage_share"


def random_weights(folder: Path, vae_preset: str) -> dict[str, str]:
    """Real-architecture models with random weights on disk, as build.py's overrides."""
    import open_clip
    import torch

    from bench.vae_speed import WIDTHS
    from model.oobleck import OobleckSpec, diffusers_to_sat, get_preset
    from model.vae import new_model

    folder.mkdir(parents=True, exist_ok=True)
    clip_ckpt = folder / "ViT-B-32-random.pt"
    if not clip_ckpt.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), clip_ckpt)
    vae_json, vae_ckpt = folder / f"{vae_preset}-random.json", folder / f"{vae_preset}-random.ckpt"
    if not vae_ckpt.exists():
        p = get_preset(vae_preset)
        channels, mults = WIDTHS[vae_preset]
        spec = OobleckSpec(sample_rate=p.sample_rate, strides=p.strides, channels=channels, c_mults=mults,
                           decoder_channels=channels, latent_dim=p.latent_dim, audio_channels=p.audio_channels,
                           final_tanh=False, embedded=False)
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in new_model(spec).state_dict().items()}  # weight norm in place
        vae_json.write_text(json.dumps(spec.to_sat_config(), indent=1))
        torch.save({"state_dict": diffusers_to_sat(state, len(spec.strides))}, vae_ckpt)
    return {
        "clip_embed.model": "ViT-B-32", "clip_embed.pretrained": str(clip_ckpt), "clip_embed.on_missing": "fail",
        "vae_latents.preset": vae_preset, "vae_latents.config_file": str(vae_json),
        "vae_latents.checkpoint": str(vae_ckpt), "vae_latents.on_missing": "fail",
    }


def run(inputs: Path, out: Path, overrides: dict[str, str]) -> dict:
    import shutil

    from pipeline.build import build
    from pipeline.config import load_config

    shutil.rmtree(out, ignore_errors=True)
    items = {"runner.engine": "loop", "runner.progress_bars": "false", **overrides}
    config = load_config("demo", [f"{k}={v}" for k, v in items.items()])
    t0 = time.perf_counter()
    record = build(str(inputs), str(out), config, quiet=True)
    wall = time.perf_counter() - t0
    stages = {name: {"seconds": round(s["seconds"], 3), "setup_seconds": round(s.get("setup_seconds", 0.0), 3),
                     "rows_in": int(s["rows_in"])} for name, s in record["stages"].items()}
    return {"wall_s": round(wall, 3), "clips": record["counts"]["clips_written"], "stages": stages,
            "skipped": sorted(record["skipped_stages"])}


def table(res: dict) -> str:
    full, base = res["with_models"], res["cpu_only"]
    total = sum(s["seconds"] + s["setup_seconds"] for s in full["stages"].values())
    lines = [
        f"# Share of end-to-end demo time per stage ({res['device']})", "",
        f"`python -m bench.stage_share --videos {res['videos']} --seconds {res['seconds']}` on {res['machine']['nproc']} cores "
        f"({res['machine']['cpu_model']}), commit {res['commit']}, {res['when']}.", "",
        "Models: open_clip ViT-B-32 and the SongBloom VAE geometry with RANDOM weights (speed only). "
        "Single-process loop, so every second belongs to one stage.", "",
        "| stage | items in | processing s | set-up s | share of stage time | s per clip |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    clips = max(full["clips"], 1)
    for name, s in full["stages"].items():
        share = (s["seconds"] + s["setup_seconds"]) / total if total else 0.0
        lines.append(f"| {name} | {s['rows_in']} | {s['seconds']:.2f} | {s['setup_seconds']:.2f} | {100 * share:.1f} % | {s['seconds'] / clips:.3f} |")
    lines += [
        "", f"| run | wall s | clips | ratio to CPU-only |", "|---|---:|---:|---:|",
        f"| CPU-only stages (model stages skipped), baseline | {base['wall_s']:.1f} | {base['clips']} | 1.00 |",
        f"| with CLIP + VAE | {full['wall_s']:.1f} | {full['clips']} | {full['wall_s'] / base['wall_s']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--vae", default="songbloom")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the baseline run skips the model stages at once
    inputs = make_inputs(argparse.Namespace(videos=args.videos, seconds=args.seconds, width=320, height=240, timeout=None))
    overrides = random_weights(WORK / "models", args.vae)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # give the model stages the GPU
        overrides.update({"clip_embed.num_gpus": "0.5", "vae_latents.num_gpus": "0.5"})
    res = {
        "device": device, "videos": args.videos, "seconds": args.seconds, "machine": machine(), "commit": git("rev-parse", "--short", "HEAD"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_only": run(inputs, WORK / "out_cpu_only", {"clip_embed.on_missing": "skip", "vae_latents.on_missing": "skip"}),
        "with_models": run(inputs, WORK / "out_models", overrides),
    }
    models = {"clip_embed", "vae_latents"}
    assert models <= set(res["cpu_only"]["skipped"]) and not models & set(res["with_models"]["skipped"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"stage_share_{device}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"stage_share_{device}.md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
