"""What travels with the data instead of going to a central actor: rejects and per-stage statistics.

A reject becomes a small side row (`meta["_reject"]`, no arrays) that later stages pass through
untouched until the writer commits it beside the shard of its batch. Each stage call's statistics
(rows in/out, rejects, seconds, counters) ride on the last item it emits (`meta["_stats"]`), or on
an empty carrier row when it emits nothing. The writer sums what its batch carried into the
metadata of the file that commits the batch, so the run's totals are read back from committed
files: a retried task overwrites its own file and cannot count twice."""
from __future__ import annotations

import uuid
from typing import Any

from pipeline.stage import Row

REJECT, STATS, CARRIER = "_reject", "_stats", "_carrier"


def reject_row(record: dict[str, Any]) -> Row:
    return {"key": f"reject:{record['level']}:{record['key']}", "meta": {REJECT: record}}


def carrier_row() -> Row:
    return {"key": f"stats:{uuid.uuid4().hex}", "meta": {CARRIER: True}}


def is_side(row: Row) -> bool:
    meta = row["meta"]
    return REJECT in meta or CARRIER in meta


def merge(into: dict, more: dict | None) -> dict:
    """Sum nested dicts of numbers (stage -> field -> value; counters -> name -> value)."""
    for name, value in (more or {}).items():
        if isinstance(value, dict):
            merge(into.setdefault(name, {}), value)
        else:
            into[name] = into.get(name, 0) + value
    return into


def take_stats(row: Row) -> dict | None:
    return row["meta"].pop(STATS, None)


def attach_stats(row: Row, stats: dict) -> Row:
    if stats:
        row["meta"][STATS] = merge(row["meta"].get(STATS) or {}, stats)
    return row


def node_id() -> str | None:
    """The Ray node this process runs on (first 8 hex digits), or None outside Ray."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else None
