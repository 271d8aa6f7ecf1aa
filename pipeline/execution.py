"""Running one stage on one batch: rows <-> column batches, timing, rejects and statistics carried
with the data. Shared by the Ray runner (inside map_batches) and the single-process loop."""
from __future__ import annotations

import io
import json
import time
from typing import Iterator

import numpy as np

from pipeline.carry import attach_stats, carrier_row, is_side, merge, node_id, reject_row, take_stats
from pipeline.config import Config
from pipeline.faults import fault
from pipeline.registry import drops_after, stage_class
from pipeline.stage import Reject, Row, RunContext

TEXT_FIELDS = ("key", "meta")


def array_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes. Arrays cross Ray Data as a binary column, not a tensor column:
    blocks without the column (reject and statistics rows) then merge with blocks that have it
    (as nulls), which Ray Data's tensor columns cannot do ("buffer is too small")."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def bytes_array(data: bytes) -> np.ndarray:
    """The inverse of array_bytes, without a copy (read-only, like Ray's own zero-copy arrays)."""
    view = memoryview(data)
    stream = io.BytesIO(view)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    array = np.frombuffer(view, dtype=dtype, offset=stream.tell(), count=int(np.prod(shape, dtype=np.int64)))
    return array.reshape(shape, order="F" if fortran else "C")


def to_rows(batch: dict[str, np.ndarray]) -> list[Row]:
    rows = []
    for i in range(len(batch["key"])):
        row: Row = {"key": str(batch["key"][i]), "meta": json.loads(batch["meta"][i])}
        for name, column in batch.items():
            if name not in TEXT_FIELDS and column[i] is not None:
                value = column[i]
                row[name] = bytes_array(value) if isinstance(value, (bytes, bytearray, memoryview)) else value
        rows.append(row)
    return rows


def to_batches(rows: list[Row]) -> Iterator[dict[str, np.ndarray]]:
    """One column batch; an array field a row lacks is None there."""
    if not rows:
        return
    fields = sorted({name for row in rows for name in row if name not in TEXT_FIELDS})
    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "meta": np.array([json.dumps(r["meta"], ensure_ascii=False) for r in rows], dtype=object),
    }
    for name in fields:
        column = np.empty(len(rows), dtype=object)
        column[:] = [array_bytes(r[name]) if name in r else None for r in rows]
        batch[name] = column
    yield batch


class StageRunner:
    """Owns one stage instance (set up once). Rejects leave as side rows and statistics ride on the
    outgoing rows (pipeline/carry.py): nothing here waits on anyone else."""

    def __init__(self, stage_name: str, config_json: str, context: RunContext):
        config = Config.model_validate_json(config_json)
        self.stage = stage_class(stage_name)(config, context)
        self.drop = drops_after(list(config.stages)).get(stage_name, ())
        self.context = context
        t0 = time.perf_counter()
        self.stage.setup()
        self._setup = {"setup_seconds": time.perf_counter() - t0, "workers": 1}  # rides on the first call

    def run_rows(self, rows: list[Row]) -> Iterator[Row]:
        """Accepted rows and reject rows out, the last one carrying this call's statistics."""
        fault(f"stage.{self.stage.name}")
        if self.stage.takes_side_rows:  # the writer: commits rejects and statistics itself
            yield from self.stage.run(rows, self.drop)
            return
        carried: dict = {}
        work = []
        for row in rows:
            merge(carried, take_stats(row))  # upstream statistics move on with this call's output
            if is_side(row):
                yield row  # rejects and carriers pass through untouched
            else:
                work.append(row)
        out_count, rejected, seconds = 0, 0, 0.0
        held: Row | None = None
        items = self.stage.run(work, self.drop)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                seconds += time.perf_counter() - t0
                break
            seconds += time.perf_counter() - t0
            if isinstance(item, Reject):
                rejected += 1
                item = reject_row(item.to_record())
            else:
                out_count += 1
            if held is not None:
                yield held
            held = item
        own = {"rows_in": len(work), "rows_out": out_count, "rejected": rejected, "seconds": seconds,
               "calls": 1 if work else 0, **self._setup}
        self._setup = {}
        counters = self.stage.take_counters()
        if work and (node := node_id()):
            counters[f"calls_on_node.{node}"] = 1  # where the work ran: a cluster run shows its spread
        stats = merge(carried, {self.stage.name: own, **({"counters": {f"{self.stage.name}.{k}": v for k, v in counters.items()}} if counters else {})})
        yield attach_stats(held if held is not None else carrier_row(), stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """map_batches entry for actor-pool stages (model stages: one batch in, one out)."""
        out = list(self.run_rows(to_rows(batch)))
        if out:
            yield from to_batches(out)


def chain_rows(runners: list[StageRunner], rows: list[Row]) -> Iterator[Row]:
    """Rows through several stages in this process, depth first: each row the first stage emits
    goes straight on through the rest, so a video's clips never pile up between stages. Side rows
    (rejects, statistics carriers) skip the later stages: only the writer reads them."""
    if not runners:
        yield from rows
        return
    first, rest = runners[0], runners[1:]
    for row in first.run_rows(rows):
        if is_side(row) or not rest:
            yield row
        else:
            yield from chain_rows(rest, [row])


_RUNNERS: dict[tuple, StageRunner] = {}


def _runner(stage_name: str, config_json: str, context: RunContext) -> StageRunner:
    """One StageRunner per stage and worker process, reused by every task the process runs."""
    ident = (stage_name, config_json, context.run_id)
    if ident not in _RUNNERS:
        _RUNNERS[ident] = StageRunner(stage_name, config_json, context)
    return _RUNNERS[ident]


def run_stages_task(batch: dict[str, np.ndarray], stage_names: list[str], config_json: str, context: RunContext) -> Iterator[dict]:
    """map_batches entry for stateless stages, one or several fused in one task: each output row
    leaves as its own small batch as soon as it exists (segment is 1 -> N, and a long video's
    clips should not all be held)."""
    runners = [_runner(name, config_json, context) for name in stage_names]
    for row in chain_rows(runners, to_rows(batch)):
        yield from to_batches([row])
