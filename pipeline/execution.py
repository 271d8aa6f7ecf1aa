"""Running one stage on one batch: rows <-> column batches, timing, rejects to the ledger.
Shared by the Ray runner (inside map_batches) and the single-process loop."""
from __future__ import annotations

import json
import time
from typing import Iterator

import numpy as np

from pipeline.config import Config
from pipeline.registry import drops_after, stage_class
from pipeline.stage import Reject, Row, RunContext

TEXT_FIELDS = ("key", "meta")


def to_rows(batch: dict[str, np.ndarray]) -> list[Row]:
    rows = []
    for i in range(len(batch["key"])):
        row: Row = {"key": str(batch["key"][i]), "meta": json.loads(batch["meta"][i])}
        for name, column in batch.items():
            if name not in TEXT_FIELDS:
                row[name] = column[i]
        rows.append(row)
    return rows


def to_batches(rows: list[Row]) -> Iterator[dict[str, np.ndarray]]:
    """Column batches; rows with different array fields go in different batches."""
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    for fields, group in groups.items():
        batch = {
            "key": np.array([r["key"] for r in group], dtype=object),
            "meta": np.array([json.dumps(r["meta"], ensure_ascii=False) for r in group], dtype=object),
        }
        for name in fields:
            if name not in TEXT_FIELDS:
                batch[name] = np.stack([r[name] for r in group])
        yield batch


class StageRunner:
    """Owns one stage instance (set up once) and records every call in the ledger."""

    def __init__(self, stage_name: str, config_json: str, context: RunContext, stream: bool = False):
        config = Config.model_validate_json(config_json)
        self.stage = stage_class(stage_name)(config, context)
        self.drop = drops_after(list(config.stages)).get(stage_name, ())
        self.context = context
        self.stream = stream  # yield each output row as soon as it exists (1 -> N stages)
        self._pending: list = []
        t0 = time.perf_counter()
        self.stage.setup()
        self._record(0, 0, 0.0, [], {"setup_seconds": time.perf_counter() - t0, "workers": 1})

    def run_rows(self, rows: list[Row]) -> Iterator[Row]:
        """Accepted rows out; rejects and stats to the ledger."""
        out_count, rejects, seconds = 0, [], 0.0
        items = self.stage.run(rows, self.drop)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                seconds += time.perf_counter() - t0
                break
            seconds += time.perf_counter() - t0
            if isinstance(item, Reject):
                rejects.append(item.to_record())
            else:
                out_count += 1
                yield item
        self._record(len(rows), out_count, seconds, rejects, self.stage.take_counters() or None)

    def _record(self, rows_in: int, rows_out: int, seconds: float, rejects: list[dict], counters: dict | None = None) -> None:
        ledger = self.context.ledger
        if ledger is None:
            return
        ref = ledger.record(self.stage.name, rows_in, rows_out, seconds, rejects, counters)
        if ref is not None:
            self._pending.append(ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rows = to_rows(batch)
        if self.stream:
            for row in self.run_rows(rows):
                yield from to_batches([row])
        else:
            out = list(self.run_rows(rows))
            if out:
                yield from to_batches(out)
        self.settle()

    def settle(self) -> None:
        """Wait until this worker's ledger calls have landed (so nothing is lost at the end)."""
        if self._pending:
            import ray

            ray.get(self._pending)
            self._pending = []


_RUNNERS: dict[tuple, StageRunner] = {}


def run_stage_task(batch: dict[str, np.ndarray], stage_name: str, config_json: str, context: RunContext, stream: bool) -> Iterator[dict]:
    """map_batches entry for stateless stages: one StageRunner per worker process, reused."""
    ident = (stage_name, config_json, context.run_id)
    if ident not in _RUNNERS:
        _RUNNERS[ident] = StageRunner(stage_name, config_json, context, stream)
    yield from _RUNNERS[ident](batch)
