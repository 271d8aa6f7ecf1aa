"""Train Video-Robin: one explicit loop, single process by default, the same loop on N Ray Train
workers (DDP) with `--workers N`.

    python model/train.py --stage t2m --shards OUT --preset base --out runs/t2m --steps 20000
    python model/train.py --stage v2m --shards OUT --init runs/t2m --out runs/v2m --freeze text
    python model/train.py ... --workers 4 --gpu        # Ray Train TorchTrainer, NCCL, bf16

A run folder (`--out`) holds checkpoints/step_XXXXXXXX.pt, metrics.jsonl, tb/ (TensorBoard),
ranks/rank{R}.json (each rank's parameter digest at the end) and, for v2m, init_report.json. Running
the same command again resumes from the newest checkpoint; the resumed run gives the same batches,
the same random draws and so the same losses as one that never stopped: the data stream is a function
of (seed, rank, epoch), and torch's RNG is reseeded every step from (seed, rank, step)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python model/train.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# Arguments that define a run: a resumed run takes them from its checkpoint, so that it continues the
# very same run (its schedule, its data stream, its frozen parts).
RUN_DEFINING = ("stage", "preset", "model", "rhythm", "init", "freeze", "steps", "batch_size", "lr", "min_lr_ratio",
                "warmup", "betas", "weight_decay", "grad_clip", "ema_decay", "seed", "epoch_steps",
                "shuffle_buffer", "num_workers", "stats_batches")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="model/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=("t2m", "v2m"), required=True,
                   help="t2m: text-to-music pretraining; v2m: video fine-tuning (from a t2m --init)")
    g.add_argument("--shards", required=True,
                   help="pipeline OUT folder, folder of .tar, glob, brace pattern or URLs ('::' between several)")
    g.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, tb/")
    g.add_argument("--preset", default="base", help="model preset: debug, base, large")
    g.add_argument("--model", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. --model dit_layers=4 patch=8")
    g.add_argument("--rhythm", action="store_true", help="condition on the cut and motion channels of rhythm.npy")
    g.add_argument("--init", default=None, help="v2m: the t2m checkpoint (or t2m run folder) to start from")
    g.add_argument("--freeze", default="", help="comma list of parts to freeze: text,lm,fsq,rite,dit,patch,video")
    g.add_argument("--resume", nargs="?", const="latest", default="auto",
                   help="resume from RUN_DIR's newest checkpoint (default: when there is one) or from PATH")
    g.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="refuse to resume (fails when --out already holds checkpoints)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=20000, help="total optimizer steps (the schedule's length)")
    o.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step; resume later")
    o.add_argument("--batch-size", type=int, default=16, help="samples per step per rank")
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    o.add_argument("--warmup", type=int, default=500, help="linear warmup steps")
    o.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    o.add_argument("--ema-decay", type=float, default=0.999)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    d = p.add_argument_group("data")
    d.add_argument("--epoch-steps", type=int, default=1000,
                   help="steps per (resampled) epoch: the unit the data stream is reseeded by")
    d.add_argument("--shuffle-buffer", type=int, default=64, help="samples in the shuffle buffer")
    d.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    d.add_argument("--stats-batches", type=int, default=8, help="batches that set the latent mean/std (fresh t2m)")
    r = p.add_argument_group("output")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--ckpt-every", type=int, default=1000)
    r.add_argument("--keep-ckpts", type=int, default=3, help="newest checkpoints kept (0 = all)")
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    x = p.add_argument_group("distributed")
    x.add_argument("--workers", type=int, default=0, help="N > 0: run on N Ray Train workers (DDP)")
    x.add_argument("--gpu", action="store_true", help="train on CUDA (one GPU per Ray worker); NCCL; bf16")
    x.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Ray worker reserves")
    x.add_argument("--find-unused", action="store_true",
                   help="DDP find_unused_parameters (only for a model change that leaves parameters out of a step)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.betas = list(args.betas)
    return args


# -- distributed context -------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ray: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.world_size).tolist()


def local_dist(gpu: bool) -> Dist:
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("--gpu: CUDA is not available here")
    return Dist(device=torch.device("cuda" if gpu else "cpu"))


class LossModule(torch.nn.Module):
    """`VideoRobin.loss` as a forward(), so that DDP sees it (its hooks run around forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]):
        return self.model.loss(batch)


# -- helpers -------------------------------------------------------------------------------------


def parameter_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases, scalars)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def json_safe(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def take_run_args(args: argparse.Namespace, saved: dict[str, Any], log) -> None:
    """A resumed run continues the checkpoint's run: its run-defining arguments win (a larger --steps
    is allowed: the cosine then stretches from the resumed step on)."""
    defaults = vars(build_parser().parse_args(["--stage", "t2m", "--shards", "x", "--out", "x"]))
    for key in RUN_DEFINING:
        if key not in saved:
            continue
        mine, theirs = getattr(args, key), saved[key]
        if isinstance(mine, tuple):
            mine = list(mine)
        if mine == theirs:
            continue
        if key == "steps" and mine != defaults["steps"]:
            log(f"resume: --steps {mine} replaces the checkpoint's {theirs} (the schedule changes)")
            continue
        if mine != defaults.get(key) and key != "stage":
            log(f"resume: --{key.replace('_', '-')} {mine!r} ignored: the run was started with {theirs!r}")
        setattr(args, key, theirs)


def build_config(args: argparse.Namespace, geometry, init_config: dict[str, Any] | None):
    from model.config import VideoRobinConfig, parse_overrides, preset

    overrides = parse_overrides(list(args.model))
    if init_config is not None:  # v2m: the t2m network, plus the video projection
        cfg = VideoRobinConfig.from_dict(init_config).override(**overrides)
    else:
        cfg = preset(args.preset, **overrides)
    changes: dict[str, Any] = {"latent_channels": geometry.latent_channels, "latent_rate": geometry.latent_rate,
                               "use_video": args.stage == "v2m", "use_rhythm": bool(args.rhythm or cfg.use_rhythm)}
    if args.stage == "v2m":
        changes["clip_dim"] = geometry.clip_dim
    if init_config is not None and init_config["latent_channels"] != geometry.latent_channels:
        raise ValueError(f"--init was trained on {init_config['latent_channels']}-channel latents, the shards hold "
                         f"{geometry.latent_channels}: use shards from the same VAE")
    return cfg.override(**changes)


# -- the loop ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, dist: Dist | None = None) -> dict[str, Any]:
    """The training loop (the same one on every rank). Returns a summary (rank 0's view)."""
    from model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from model.config import VideoRobinConfig
    from model.data import epoch_batches, latent_stats, make_seed, read_geometry, resolve_shards, to_device
    from model.ema import EMA
    from model.metrics import MetricsLog, print_progress, progress_line
    from model.schedule import make_scheduler
    from model.text import load_tokenizer
    from model.video_robin import VideoRobin

    dist = dist or local_dist(args.gpu)
    log = (lambda msg: print(msg, flush=True)) if dist.main else (lambda msg: None)
    run_dir = Path(args.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    # Resume?
    ckpt: dict[str, Any] | None = None
    found = latest_checkpoint(run_dir)
    if args.resume == "never" and found is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({found.name}); drop --no-resume or use another --out")
    if args.resume not in ("auto", "never", "latest"):
        ckpt = load_checkpoint(args.resume)
    elif found is not None and args.resume != "never":
        ckpt = load_checkpoint(found)
    elif args.resume == "latest":
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints")
    if ckpt is not None:
        if ckpt["stage"] != args.stage:
            raise ValueError(f"the checkpoint is stage {ckpt['stage']}, the command says --stage {args.stage}")
        take_run_args(args, ckpt.get("train_args", {}), log)
        saved = ckpt.get("resume", {})
        if saved and saved.get("world_size") != dist.world_size:
            log(f"resume: the run had {saved.get('world_size')} rank(s), now {dist.world_size}: "
                "training continues, but the data stream differs from an uninterrupted run")

    urls = resolve_shards(args.shards)
    geometry = read_geometry(urls, need_clip=args.stage == "v2m")

    # Configuration and model.
    init_ckpt = None
    if ckpt is not None:
        cfg = VideoRobinConfig.from_dict(ckpt["config"])
        if cfg.latent_channels != geometry.latent_channels:
            raise ValueError(f"the checkpoint expects {cfg.latent_channels}-channel latents, the shards hold "
                             f"{geometry.latent_channels}")
    else:
        if args.stage == "v2m" and args.init:
            init_ckpt = load_checkpoint(args.init)
            if init_ckpt.get("stage") != "t2m":
                raise ValueError(f"--init {args.init}: expected a t2m checkpoint, got stage {init_ckpt.get('stage')!r}")
        elif args.stage == "v2m":
            log("v2m without --init: the whole network starts from random weights")
        cfg = build_config(args, geometry, init_ckpt["config"] if init_ckpt else None)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(make_seed(args.seed, 0))  # the same initial weights on every rank
    model = VideoRobin(cfg, tokenizer.vocab_size)

    init_report: dict[str, Any] | None = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif init_ckpt is not None:
        init_report = model.load_t2m(init_ckpt["model"])
        log(f"v2m init from {args.init}: {len(init_report['loaded'])} t2m tensors loaded, "
            f"{len(init_report['new'])} new: {', '.join(init_report['new'][:8])}{' ...' if len(init_report['new']) > 8 else ''}")
    else:
        mean, std = latent_stats(urls, cfg, seed=args.seed, batches=args.stats_batches, batch_size=args.batch_size)
        model.set_latent_stats(mean, std)
        log(f"latent stats over {args.stats_batches} batches: mean |{mean.abs().mean():.3f}|, std {std.mean():.3f}")
    parts = [p for p in str(args.freeze).split(",") if p.strip()]
    if parts:
        model.freeze([p.strip() for p in parts])
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    if init_report is not None and dist.main:
        (run_dir / "init_report.json").write_text(json.dumps(
            {"init": str(args.init), "loaded": init_report["loaded"], "new": init_report["new"], "frozen": frozen}, indent=1))

    model.to(dist.device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, min(args.warmup, args.steps), args.steps, args.min_lr_ratio)
    step = 0
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", ckpt["step"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if args.steps != ckpt.get("train_args", {}).get("steps", args.steps):
            scheduler = make_scheduler(optimizer, min(args.warmup, args.steps), args.steps, args.min_lr_ratio)
            scheduler.last_epoch = ckpt["step"] - 1
            scheduler.step()
        step = int(ckpt["step"])
        log(f"resumed from step {step}")
    del ckpt, init_ckpt

    trained = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(LossModule(model), device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                          find_unused_parameters=args.find_unused)
    else:
        trained = LossModule(model)
    use_amp = dist.device.type == "cuda" and not args.fp32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    trainable = [p for p in model.parameters() if p.requires_grad]

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "config": cfg.to_dict(), "stage": args.stage,
                "data": {"latent": geometry.latent, "clip_embed": geometry.clip_embed if cfg.use_video else None},
                "train_args": json_safe(args), "ema_updates": ema.updates, "vocab_size": tokenizer.vocab_size,
                "resume": {"seed": args.seed, "world_size": dist.world_size, "batch_size": args.batch_size,
                           "epoch_steps": args.epoch_steps, "num_workers": args.num_workers}}

    stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    metrics = MetricsLog(run_dir, resume_step=step, tensorboard=args.tensorboard) if dist.main else None
    if dist.main:
        log(f"{args.stage}: {model.num_params() / 1e6:.2f}M parameters ({sum(p.numel() for p in trainable) / 1e6:.2f}M "
            f"trained), {len(urls)} shard(s), {dist.world_size} rank(s) x {args.batch_size} samples, "
            f"steps {step} -> {stop} of {args.steps}, device {dist.device}{', bf16' if use_amp else ''}")

    keys_hash = hashlib.sha256()
    keys_head: list[str] = []
    seen = skipped = 0
    window: dict[str, float] = {}
    window_n, window_t, window_samples = 0, time.time(), 0
    started, start_step = time.time(), step
    last: dict[str, Any] = {}
    saved_at: int | None = None
    trained.train()
    while step < stop:
        epoch, skip = divmod(step, args.epoch_steps)
        batches = epoch_batches(urls, cfg, batch_size=args.batch_size, seed=args.seed, rank=dist.rank, epoch=epoch,
                                batches=args.epoch_steps, skip=skip, num_workers=args.num_workers,
                                shuffle_buffer=args.shuffle_buffer, pin_memory=dist.device.type == "cuda")
        for batch in batches:
            for k in batch["keys"]:
                keys_hash.update(k.encode() + b"\n")
            if len(keys_head) < 64:
                keys_head.extend(batch["keys"][: 64 - len(keys_head)])
            seen += len(batch["keys"])
            skipped += batch["skipped"]
            torch.manual_seed(make_seed(args.seed, dist.rank, step, 3))
            with autocast():
                loss, extra = trained(to_device(batch, dist.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            ema.update(model)
            step += 1

            values = {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float()}
            for k, v in extra.items():  # the model's own metrics (tensors or numbers)
                if k not in values and (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
                    values[k] = v.detach().float() if torch.is_tensor(v) else float(v)
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v  # tensors: no device sync until the log step
            window_n += 1
            window_samples += len(batch["keys"]) * dist.world_size
            if step % args.log_every == 0 or step == stop:
                names = sorted(window)
                means = dist.mean([float(window[k]) / window_n for k in names])
                dt = time.time() - window_t
                row = dict(zip(names, means))
                row.update(lr=lr, samples_per_s=window_samples / dt, steps_per_s=window_n / dt, epoch=epoch,
                           skipped_samples=skipped)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"step {step}: loss is {row['loss']}")
                if metrics is not None:
                    last = metrics.log(step, row)
                    print_progress(progress_line(step, args.steps, last, started, start_step, stop))
                window, window_n, window_t, window_samples = {}, 0, time.time(), 0
            if dist.main and (step % args.ckpt_every == 0 or step == stop):
                save_checkpoint(state(), run_dir, step, keep=args.keep_ckpts)
                saved_at = step
            if step >= stop or step % args.epoch_steps == 0:
                break
    if dist.main and saved_at != step:  # a run with nothing to do (steps 0, or already at the end)
        save_checkpoint(state(), run_dir, step, keep=args.keep_ckpts)
    if metrics is not None:
        metrics.close()

    digest = {"rank": dist.rank, "world_size": dist.world_size, "step": step, "params_sha256": parameter_digest(model),
              "samples": seen, "skipped": skipped, "keys_sha256": keys_hash.hexdigest(), "keys_head": keys_head}
    (run_dir / "ranks").mkdir(exist_ok=True)
    (run_dir / "ranks" / f"rank{dist.rank}.json").write_text(json.dumps(digest, indent=1))
    return {"step": step, "run_dir": str(run_dir), "last": last, "params_sha256": digest["params_sha256"],
            "checkpoint": str(latest_checkpoint(run_dir)) if dist.main else None, "init_report": init_report,
            "frozen": frozen}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.workers > 0:
        from model.distributed import launch

        return launch(args)
    return run(args)


if __name__ == "__main__":
    main()
