"""The ledger: per-stage counters and timings, the rejects table, and shard numbering.

One instance per run: a plain object for the single-process loop, a Ray actor for Ray runs
(stages call it fire-and-forget). Rejects are appended to OUT/rejects/ in atomic parquet parts."""
from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ownership import check

REJECT_SCHEMA = pa.schema([
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("source_id", pa.string()),
    ("source_path", pa.string()),
    ("key", pa.string()),
    ("level", pa.string()),
    ("clip_index", pa.int32()),
    ("is_last_clip", pa.bool_()),
    ("run_id", pa.string()),
])
FLUSH_EVERY = 200
FLUSH_SECONDS = 5.0


class Ledger:
    def __init__(self, output_dir: str, run_id: str, known_rejects: set[tuple[str, str]] = frozenset(), first_shard: int = 0):
        self.out = Path(output_dir)
        self.dir = self.out / "rejects"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.known = set(known_rejects)  # (level, key) already in the rejects table
        self.pending: list[dict] = []
        self.parts = 0
        self.last_flush = time.monotonic()
        self.next_shard = first_shard
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: {"rows_in": 0, "rows_out": 0, "rejected": 0, "seconds": 0.0, "calls": 0})
        self.reasons: Counter = Counter()  # (stage, level, reason) -> count, this run
        self.counters: Counter = Counter()

    def record(self, stage: str, rows_in: int, rows_out: int, seconds: float, rejects: list[dict], counters: dict | None = None) -> None:
        s = self.stats[stage]
        s["rows_in"] += rows_in
        s["rows_out"] += rows_out
        s["rejected"] += len(rejects)
        s["seconds"] += seconds
        s["calls"] += 1 if rows_in else 0
        for name, value in (counters or {}).items():
            if name in ("setup_seconds", "workers"):  # per-stage set-up cost, kept apart from work
                s[name] = s.get(name, 0) + value
            else:
                self.counters[f"{stage}.{name}"] += value
        for rec in rejects:
            self.reasons[(rec["stage"], rec["level"], rec["reason"])] += 1
            ident = (rec["level"], rec["key"])
            if ident in self.known:  # already recorded by an earlier, interrupted run
                continue
            self.known.add(ident)
            self.pending.append({**rec, "run_id": self.run_id})
        if len(self.pending) >= FLUSH_EVERY or (self.pending and time.monotonic() - self.last_flush > FLUSH_SECONDS):
            self.flush()

    def next_shard_index(self) -> int:
        self.next_shard += 1
        return self.next_shard - 1

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        path = self.dir / f"{self.run_id}-{self.parts:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(self.pending, schema=REJECT_SCHEMA), tmp)
        check(self.out, self.run_id)  # a superseded run's ledger commits nothing
        os.replace(tmp, path)
        self.parts += 1
        self.pending = []

    def snapshot(self) -> dict[str, Any]:
        return {
            "stages": {k: dict(v) for k, v in self.stats.items()},
            "reasons": [{"stage": s, "level": lvl, "reason": r, "count": n} for (s, lvl, r), n in sorted(self.reasons.items())],
            "counters": dict(self.counters),
            "shards_named": self.next_shard,
        }

    def finish(self) -> dict[str, Any]:
        self.flush()
        return self.snapshot()


class LedgerClient:
    """The same calls whether the ledger is a local object or a Ray actor."""

    def __init__(self, target: Any = None, actor_name: str | None = None, namespace: str | None = None):
        self._target, self._actor_name, self._namespace = target, actor_name, namespace

    def _get(self):
        if self._target is None:
            import ray

            self._target = ray.get_actor(self._actor_name, namespace=self._namespace)
        return self._target

    @property
    def is_actor(self) -> bool:
        return not isinstance(self._get(), Ledger)

    def record(self, *args, **kwargs):
        """Returns the call's ObjectRef for an actor (callers may wait on it), else None."""
        target = self._get()
        if isinstance(target, Ledger):
            return target.record(*args, **kwargs)
        return target.record.remote(*args, **kwargs)

    def next_shard_index(self) -> int:
        target = self._get()
        if isinstance(target, Ledger):
            return target.next_shard_index()
        import ray

        return ray.get(target.next_shard_index.remote())

    def __reduce__(self):  # ship by name to Ray workers, never the local object
        return (LedgerClient, (None, self._actor_name, self._namespace))
