"""`--workers N`: the training loop of model/train.py on N Ray Train workers (Train V2
`TorchTrainer`; DDP over gloo on CPU, NCCL on GPU).

Ray is joined, not started, when it is already up: under `ray job submit` `ray.init()` attaches to
the cluster, and in tests the session's local Ray is reused. Checkpoints, metrics and TensorBoard
files are written by rank 0 into `--out` itself (so `--out` must be on storage every node can reach
when the workers span nodes); Ray Train's own run state goes to `--out/ray`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker (torch.distributed is already initialised by TorchConfig)."""
    import ray.train
    import ray.train.torch
    import torch

    from model.train import Dist, run

    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.get("gpu") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = Dist(rank=context.get_world_rank(), world_size=context.get_world_size(), device=device, ray=True)
    summary = run(argparse.Namespace(**config), dist)
    # Every worker reports once (the call is a barrier, so no rank leaves before the others are done).
    ray.train.report({"step": summary["step"], **{k: v for k, v in summary["last"].items() if k != "step"}})


def launch(args: argparse.Namespace) -> dict[str, Any]:
    """Run `run(args)` on `args.workers` Ray Train workers; returns rank 0's final metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()
    run_dir = Path(args.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(vars(args))
    config["out"] = str(run_dir)
    config["shards"] = _absolute_shards(args.shards)
    resources = {"GPU": 1, "CPU": args.cpus_per_worker} if args.gpu else {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        run_config=RunConfig(storage_path=str(run_dir / "ray"), name=f"{args.stage}-{run_dir.name}"),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError when a worker fails
    # Train V2 keeps reported metrics only with checkpoints; ours live in the run folder.
    summary = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return {"run_dir": str(run_dir), "workers": args.workers, "step": summary["step"],
            "params_sha256": summary["params_sha256"], "last": json.loads(lines[-1]) if lines else {}}


def _absolute_shards(spec: str) -> str:
    """Workers may run in another working directory: make local paths absolute."""
    parts = []
    for part in str(spec).split("::"):
        if "://" in part or part.startswith("pipe:") or Path(part).is_absolute() or not part:
            parts.append(part)
        else:
            parts.append(str(Path(part).resolve()) if not any(c in part for c in "*?[{") else str(Path.cwd() / part))
    return "::".join(parts)
