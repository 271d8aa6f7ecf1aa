"""Training metrics: one JSON line per logged step (RUN_DIR/metrics.jsonl), TensorBoard scalars
(RUN_DIR/tb) and a one-line progress print."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _scalar(value: Any) -> float | int | None:
    try:
        import torch

        if torch.is_tensor(value):
            if value.numel() != 1:
                return None
            value = value.item()
    except ImportError:
        pass
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLog:
    """Rank 0 only. On resume from step s, lines past s (written by the run that stopped) are
    dropped, so the file holds one curve."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        for k, v in values.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        return row

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def progress_line(step: int, total: int, row: dict[str, Any], started: float, start_step: int,
                  end: int | None = None) -> str:
    """`end`: where this run stops (--stop-at), when before `total`; the ETA is to there."""
    elapsed = time.time() - started
    done = step - start_step
    eta = elapsed / done * ((end or total) - step) if done > 0 else float("nan")
    return (f"step {step}/{total}  loss {row.get('loss', float('nan')):.4f}  lr {row.get('lr', 0.0):.2e}  "
            f"grad {row.get('grad_norm', float('nan')):.2f}  {row.get('samples_per_s', 0.0):.1f} samples/s  "
            f"ETA {format_eta(eta)}")


def print_progress(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
