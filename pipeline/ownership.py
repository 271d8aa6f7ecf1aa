"""One run owns an output folder at a time. A killed driver can leave Ray workers alive for a few
seconds; they check ownership before committing a shard or a rejects part, so nothing they finish
after a new run has taken over can duplicate that run's work."""
from __future__ import annotations

import os
import time
from pathlib import Path

OWNER_FILE = "runs/.owner"
GRACE_SECONDS = 3.0  # longer than an orphan's check-then-commit; Ray reaps orphans in seconds


class Superseded(RuntimeError):
    """This run no longer owns its output folder."""


def current_owner(out: str | Path) -> str | None:
    try:
        return (Path(out) / OWNER_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def claim(out: str | Path, run_id: str) -> str | None:
    """Take the folder over; wait out a killed previous owner's workers. Returns the previous owner."""
    out = Path(out)
    previous = current_owner(out)
    path = out / OWNER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".owner.{run_id}.tmp")
    tmp.write_text(run_id)
    os.replace(tmp, path)
    if previous and not (out / "runs" / f"{previous}.json").exists():
        time.sleep(GRACE_SECONDS)  # it never finished: some of its workers may still be committing
    return previous


def check(out: str | Path, run_id: str) -> None:
    owner = current_owner(out)
    if owner != run_id:
        raise Superseded(f"run {run_id} no longer owns {out} (run {owner} took over); stopping")
