"""Training checkpoints: one torch file per save under RUN_DIR/checkpoints/step_XXXXXXXX.pt, written
to a temporary name and renamed (a crash never leaves a partial file under a checkpoint's name);
readable with `torch.load(weights_only=True)`: tensors, dicts, lists, numbers and strings only.

Keys: model, ema (state_dicts with the model's keys), optimizer, scheduler, step, config
(VideoRobinConfig.to_dict()), stage ("t2m" | "v2m"), data ({"latent": ..., "clip_embed": ...} from the
shards' json), train_args (the command's arguments), resume (what an exact resume checks), ema_updates."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 0) -> Path:
    """Atomic write; then keep only the newest `keep` checkpoints (0 = keep all)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # a run folder: its newest checkpoint
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(path)}")
        path = found
    return torch.load(path, map_location=map_location, weights_only=True)
