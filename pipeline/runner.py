"""Two ways to run the same list of stages: on Ray Data (the default; local or a cluster) and as a
plain single-process loop (debugging, and the baseline the benchmarks compare against).

Inputs go through in chunks (small first, so the first shard lands early, then doubling up to
`runner.chunk_sources`). Per chunk: probe every source, the results written as parquet to
OUT/probe/<run_id>/ by the tasks themselves; dedupe by content in DuckDB; stream the winners
through segment -> ... -> writer. Nothing proportional to the input count passes through the
driver: it holds one chunk's winners at a time, as arrow."""
from __future__ import annotations

import json
import time
from typing import Callable

import pyarrow as pa

from pipeline.carry import REJECT, STATS, is_side, merge
from pipeline.config import Config
from pipeline.console import RunBar
from pipeline.execution import StageRunner, chain_rows, run_stages_task, to_batches, to_rows
from pipeline.progress import Progress
from pipeline.stage import Row, RunContext
from pipeline.storage import Storage
from shards.schema import REJECT_SCHEMA
from shards.writer import content_name, parquet_file

PROBE_SOURCES_PER_BLOCK = 16  # probing reads a header and three 1 MiB windows: cheap, so bigger blocks
PROBE_SCHEMA = pa.schema([("kind", pa.string()), ("key", pa.string()), ("path", pa.string()), ("input_index", pa.int64()),
                          ("source_id", pa.string()), ("meta", pa.string()), ("stats", pa.string())])


def input_rows(chunk: pa.Table) -> pa.Table:
    paths, indices = chunk.column("path").to_pylist(), chunk.column("input_index").to_pylist()
    return pa.table({
        "key": [f"input-{i:09d}" for i in indices],
        "meta": [json.dumps({"source": {"path": p, "input_index": i}}, ensure_ascii=False) for p, i in zip(paths, indices)],
    })


def blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    step = max(1, rows_per_block)
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]


def probe_table(rows: list[Row]) -> pa.Table:
    """Probe output rows as columns: accepted sources, rejects and statistics carriers."""
    out = []
    for row in rows:
        meta = dict(row["meta"])
        stats = meta.pop(STATS, None)
        kind = "reject" if REJECT in meta else "carrier" if is_side(row) else "row"
        source = meta.get("source", {}) if kind == "row" else {}
        out.append({"kind": kind, "key": row["key"], "path": source.get("path") or meta.get(REJECT, {}).get("source_path"),
                    "input_index": source.get("input_index"), "source_id": source.get("source_id"),
                    "meta": json.dumps(meta, ensure_ascii=False), "stats": json.dumps(stats) if stats else None})
    return pa.Table.from_pylist(out, schema=PROBE_SCHEMA)


def write_probe(rows: list[Row], output_dir: str, run_id: str, chunk: int) -> int:
    """One probe batch to OUT/probe/<run_id>/cNNNNN/<content name>.parquet (a retry overwrites)."""
    if not rows:
        return 0
    storage = Storage(output_dir)
    parquet_file(storage, f"probe/{run_id}/c{chunk:05d}/{content_name(r['key'] for r in rows)}.parquet", probe_table(rows))
    return len(rows)


def write_probe_batch(batch, output_dir: str, run_id: str, chunk: int):
    import numpy as np

    n = write_probe(to_rows(batch), output_dir, run_id, chunk)
    return {"probed": np.array([n])}


class ChunkedRun:
    """The chunk loop shared by both engines; `probe` and `stream` are the engine's own."""

    def __init__(self, config: Config, context: RunContext, storage: Storage, progress: Progress, bar: RunBar, verbose: bool = False):
        self.config, self.context, self.storage, self.progress = config, context, storage, progress
        self.bar, self.verbose = bar, verbose
        self.probe_stats: dict = {}
        self.counts = {"probe_rejected": 0, "probe_deferred": 0, "duplicates": 0, "kept": 0, "written": 0}

    def run(self, probe: Callable[[pa.Table, int], None], stream: Callable[[pa.Table], int]) -> dict:
        t_start = time.perf_counter()
        cfg = self.config.runner
        for n, chunk in enumerate(self.progress.chunks(cfg.first_chunk_sources, cfg.chunk_sources)):
            t0 = time.perf_counter()
            probe(chunk, n)
            files = [self.storage.url(f"probe/{self.context.run_id}/c{n:05d}/{f}") for f in
                     self.storage.names(f"probe/{self.context.run_id}/c{n:05d}", ".parquet")]
            rejects = self._probe_outcome(files)
            t1 = time.perf_counter()
            winners, dups, decided = self.progress.dedupe(files)
            dedupe = {"rows_in": winners.num_rows + decided, "rows_out": winners.num_rows, "rejected": decided,
                      "seconds": time.perf_counter() - t1, "calls": 1}
            merge(self.probe_stats, {"dedupe": dedupe})
            self.counts["duplicates"] += decided
            self.counts["kept"] += winners.num_rows
            self._commit_rejects(rejects + dups, n)
            self.bar.advance(inputs=len(rejects) + decided)
            written = stream(winners) if winners.num_rows else 0
            self.counts["written"] += written
            if self.verbose or self.bar.lines_instead:
                rate = self.counts["written"] / max(time.perf_counter() - t_start, 1e-9)
                self.bar.write(f"[build] chunk {n}: {chunk.num_rows} inputs, {winners.num_rows} to curate, {decided} duplicates, "
                      f"{len(rejects)} rejected at probe; {written} clips written in {time.perf_counter() - t0:.1f} s "
                      f"(run so far: {self.counts['written']} clips, {rate:.2f} clips/s)")
        return self.counts

    def committed(self, meta: dict) -> int:
        """One writer output: the progress bar moves; returns the clips it wrote."""
        self.bar.advance(inputs=meta.get("sources", 0), clips=meta["samples"])
        return meta["samples"]

    def _probe_outcome(self, files: list[str]) -> list[dict]:
        if not files:
            return []
        rows = self.progress.con.execute(
            f"SELECT kind, meta, stats FROM read_parquet({files!r}) WHERE kind <> 'row' OR stats IS NOT NULL").fetchall()
        rejects = []
        for kind, meta, stats in rows:
            merge(self.probe_stats, json.loads(stats) if stats else None)
            if kind == "reject":
                record = json.loads(meta)[REJECT]
                rejects.append(record)
                self.counts["probe_deferred" if record.get("retryable") else "probe_rejected"] += 1
        return rejects

    def _commit_rejects(self, records: list[dict], chunk: int) -> None:
        from pipeline.ownership import check

        if not records:
            return
        run_id = self.context.run_id
        table = pa.Table.from_pylist([{**r, "run_id": run_id} for r in records], schema=REJECT_SCHEMA)
        check(self.storage, run_id)
        parquet_file(self.storage, f"rejects/{run_id}-c{chunk:05d}.parquet", table)


# --- the single-process loop ---------------------------------------------------------------------

def run_loop(config: Config, context: RunContext, storage: Storage, progress: Progress, bar: RunBar, verbose: bool = False) -> ChunkedRun:
    """Every stage in this process, one item at a time."""
    cfg_json = config.model_dump_json()
    runners = [StageRunner(name, cfg_json, context) for name in config.stages]
    probe_runner, middle, writer = runners[0], runners[1:-1], runners[-1]
    run = ChunkedRun(config, context, storage, progress, bar, verbose)

    def probe(chunk: pa.Table, n: int) -> None:
        rows = table_rows(input_rows(chunk))
        for i in range(0, len(rows), PROBE_SOURCES_PER_BLOCK):
            write_probe(list(probe_runner.run_rows(rows[i:i + PROBE_SOURCES_PER_BLOCK])), context.output_dir, context.run_id, n)

    def stream(winners: pa.Table) -> int:
        buffer: list[Row] = []
        written = 0

        def flush() -> None:
            nonlocal written, buffer
            written += sum(run.committed(out["meta"]) for out in writer.run_rows(buffer))
            buffer = []

        for source in table_rows(winners):
            for row in chain_rows(middle, [source]):
                buffer.append(row)
                if len(buffer) >= config.writer.samples_per_shard:
                    flush()
        if buffer:
            flush()
        return written

    run.run(probe, stream)
    return run


def table_rows(table: pa.Table) -> list[Row]:
    """Rows of a key/meta table (meta as JSON text), as the stages take them."""
    return [{"key": r["key"], "meta": json.loads(r["meta"])} for r in table.to_pylist()]


# --- Ray Data -------------------------------------------------------------------------------------

# A task that raises (say, the store failed while the writer committed) runs again, at most 3 times:
# its outputs have content names, so the retry overwrites whatever the failed try wrote. Ray Data
# retries only system errors by default; these remote args (deprecated, gone in Ray 2.64; we pin
# 2.60) are its one way to retry application errors.
RETRY = dict(max_retries=3, retry_exceptions=True)


def _map_batches(ds, fn, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


def stage_groups(config: Config, context: RunContext, names: list[str]) -> list[list[str]]:
    """Consecutive stateless CPU stages (segment, music_dsp, visual_rhythm, template_prompts...)
    as one group each: they run fused in one task per block, one Ray Data operator, so a clip
    crosses no object store and waits in no queue between them. Actor-pool and GPU stages and the
    writer (a shard-sized batch) stand alone. runner.fuse_cpu_stages=false: every stage alone."""
    from pipeline.registry import LAST, stage_class

    groups: list[list[str]] = []
    joins = False  # whether the previous stage can take the next one into its task
    for name in names:
        res = stage_class(name)(config, context).resources
        fusable = config.runner.fuse_cpu_stages and not res.pool_size and not res.num_gpus and name != LAST
        if fusable and joins:
            groups[-1].append(name)
        else:
            groups.append([name])
        joins = fusable
    return groups


def _map(ds, names: list[str], config: Config, context: RunContext):
    """One stage, or a fused group of stateless ones, onto Ray Data: an actor pool for a stage
    with a pool size, tasks otherwise (a group asks for the most CPU any of its stages needs)."""
    import ray

    from pipeline.registry import stage_class

    res = [stage_class(name)(config, context).resources for name in names]  # instances may size themselves from config
    cfg_json = config.model_dump_json()
    common = dict(batch_size=res[0].batch_size, batch_format="numpy", num_cpus=max(r.num_cpus for r in res))
    if res[0].num_gpus:
        common["num_gpus"] = res[0].num_gpus
    if res[0].pool_size:
        return ds.map_batches(
            StageRunner,
            fn_constructor_kwargs=dict(stage_name=names[0], config_json=cfg_json, context=context),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res[0].pool_size),
            **common,
        )
    workers = {"segment": config.runner.video_workers, "writer": config.writer.workers}.get(names[0])
    if workers:
        common["compute"] = ray.data.TaskPoolStrategy(size=workers)
    return _map_batches(ds, run_stages_task, fn_kwargs=dict(stage_names=names, config_json=cfg_json, context=context),
                        **common, **RETRY)


def warn_if_starved(config: Config, context: RunContext) -> str | None:
    """Actor pools hold their CPUs for the whole run: if they leave less than the biggest task
    needs, Ray Data waits forever. Say so up front (a warning: an autoscaler may still add nodes)."""
    import ray

    from pipeline.registry import stage_class

    total = ray.cluster_resources().get("CPU", 0.0)
    res = {name: stage_class(name)(config, context).resources for name in config.stages}
    held = sum(r.num_cpus for r in res.values() if r.pool_size)
    task = max((r.num_cpus for r in res.values() if not r.pool_size), default=0.0)
    if held + task <= total:
        return None
    pools = ", ".join(f"{n}={r.num_cpus:g}" for n, r in res.items() if r.pool_size and r.num_cpus)
    message = (f"[build] WARNING: actor pools hold {held:g} of this Ray's {total:g} CPUs ({pools}) and a task needs "
               f"{task:g}: the run may wait forever for CPUs; lower those stages' num_cpus or add CPUs")
    print(message, flush=True)
    return message


def run_ray(config: Config, context: RunContext, storage: Storage, progress: Progress, bar: RunBar, verbose: bool = False) -> ChunkedRun:
    import ray

    warn_if_starved(config, context)
    first, *rest = config.stages
    run = ChunkedRun(config, context, storage, progress, bar, verbose)
    probe_cpus = 1.0

    def probe(chunk: pa.Table, n: int) -> None:
        ds = ray.data.from_arrow(blocks(input_rows(chunk), PROBE_SOURCES_PER_BLOCK))
        ds = _map(ds, [first], config, context)
        ds = _map_batches(ds, write_probe_batch, fn_kwargs=dict(output_dir=context.output_dir, run_id=context.run_id, chunk=n),
                            batch_size=None, batch_format="numpy", num_cpus=probe_cpus, **RETRY)
        for _ in ds.iter_batches(batch_size=None, batch_format="numpy"):
            pass

    def stream(winners: pa.Table) -> int:
        # At most sources_per_block a block, fewer when the chunk is small: every CPU gets a video.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per_block = max(1, min(config.runner.sources_per_block, -(-winners.num_rows // cpus)))
        ds = ray.data.from_arrow(blocks(winners, per_block))
        for names in stage_groups(config, context, rest):
            ds = _map(ds, names, config, context)
        return sum(run.committed(json.loads(m)) for batch in ds.iter_batches(batch_size=None, batch_format="numpy")
                   for m in batch["meta"])

    run.run(probe, stream)
    return run


__all__ = ["run_loop", "run_ray", "ChunkedRun", "input_rows", "probe_table", "to_batches"]
