"""One run owns an output folder at a time. A killed driver can leave Ray workers alive for a few
seconds; they check ownership before committing a shard or a rejects file, so nothing they finish
after a new run has taken over can land beside that run's work."""
from __future__ import annotations

import time

OWNER_FILE = "runs/.owner"
GRACE_SECONDS = 3.0  # longer than an orphan's check-then-commit; Ray reaps orphans in seconds


class Superseded(RuntimeError):
    """This run no longer owns its output folder."""


def current_owner(storage) -> str | None:
    try:
        return storage.read_bytes(OWNER_FILE).decode().strip() or None
    except FileNotFoundError:
        return None


def claim(storage, run_id: str) -> str | None:
    """Take the folder over; wait out a killed previous owner's workers. Returns the previous owner."""
    previous = current_owner(storage)
    storage.put_bytes(OWNER_FILE, run_id.encode())
    if previous and not storage.exists(f"runs/{previous}.json"):
        time.sleep(GRACE_SECONDS)  # it never finished: some of its workers may still be committing
    return previous


def check(storage, run_id: str) -> None:
    owner = current_owner(storage)
    if owner != run_id:
        raise Superseded(f"run {run_id} no longer owns {storage.location} (run {owner} took over); stopping")
