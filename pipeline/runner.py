"""Two ways to run the same list of stages: on Ray Data (the default; local or a cluster) and as a
plain single-process loop (debugging, and the baseline the benchmarks compare against).

Both run in two phases: probe every source (small rows), resolve duplicates by content on the
driver, then stream the accepted sources through segment -> ... -> writer."""
from __future__ import annotations

import json
from typing import Callable

from pipeline.config import Config
from pipeline.execution import StageRunner, run_stage_task, to_batches
from pipeline.stage import Reject, Row, RunContext


def source_rows(paths: list[str]) -> list[Row]:
    return [{"key": f"input-{i:09d}", "meta": {"source": {"path": p, "input_index": i}}} for i, p in enumerate(paths)]


def resolve_duplicates(probed: list[Row], done_source_ids: dict[str, str] | None = None) -> tuple[list[Row], list[Reject]]:
    """The first input (in input order) with given content wins; later copies are rejects.
    `done_source_ids` maps content already in the index (earlier runs) to the path it came from."""
    earlier = done_source_ids or {}
    seen: dict[str, str] = {}
    keep, rejects = [], []
    for row in sorted(probed, key=lambda r: r["meta"]["source"]["input_index"]):
        source = row["meta"]["source"]
        sid, path = source["source_id"], source["path"]
        first = seen.get(sid) or (earlier[sid] if earlier.get(sid, path) != path else None)
        if first:
            detail = "the same path is listed twice" if first == path else f"same content as {first}"
            key = f"{path}#{source['input_index']}" if first == path else path
            rejects.append(Reject(stage="dedupe", reason="duplicate", detail=detail, source_id=sid, source_path=path, key=key))
        else:
            seen[sid] = path
            keep.append(row)
    return keep, rejects


def _record_dedupe(context: RunContext, n_in: int, keep: list, rejects: list[Reject]) -> None:
    ref = context.ledger.record("dedupe", n_in, len(keep), 0.0, [r.to_record() for r in rejects])
    if ref is not None:
        import ray

        ray.get(ref)


def run_loop(config: Config, context: RunContext, paths: list[str], done_source_ids: dict[str, str] | None = None, on_written: Callable[[int], None] = lambda n: None) -> int:
    """Every stage in this process, one item at a time. Returns the number of samples written."""
    cfg_json = config.model_dump_json()
    runners = [StageRunner(name, cfg_json, context) for name in config.stages]
    probe, segment, middle, writer = runners[0], runners[1], runners[2:-1], runners[-1]
    probed = list(probe.run_rows(source_rows(paths)))
    keep, dups = resolve_duplicates(probed, done_source_ids)
    _record_dedupe(context, len(probed), keep, dups)
    buffer: list[Row] = []
    written = 0

    def flush() -> None:
        nonlocal written, buffer
        n = sum(1 for _ in writer.run_rows(buffer))
        written += n
        on_written(n)
        buffer = []

    for source in keep:
        for clip in segment.run_rows([source]):
            rows = [clip]
            for runner in middle:
                rows = [out for row in rows for out in runner.run_rows([row])]
            buffer.extend(rows)
            if len(buffer) >= config.writer.samples_per_shard:
                flush()
    if buffer:
        flush()
    return written


def _map(ds, name: str, config: Config, context: RunContext):
    """One stage onto Ray Data: actor pools for stages with a pool size, tasks otherwise."""
    import ray

    from pipeline.registry import stage_class

    res = stage_class(name)(config, context).resources  # instances may size themselves from config
    cfg_json = config.model_dump_json()
    stream = name == "segment"
    common = dict(batch_size=res.batch_size, batch_format="numpy", num_cpus=res.num_cpus)
    if res.num_gpus:
        common["num_gpus"] = res.num_gpus
    if res.pool_size:
        return ds.map_batches(
            StageRunner,
            fn_constructor_kwargs=dict(stage_name=name, config_json=cfg_json, context=context, stream=stream),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.pool_size),
            **common,
        )
    if name == "segment" and config.runner.video_workers:
        common["compute"] = ray.data.TaskPoolStrategy(size=config.runner.video_workers)
    return ds.map_batches(run_stage_task, fn_kwargs=dict(stage_name=name, config_json=cfg_json, context=context, stream=stream), **common)


def _dataset(rows: list[Row]):
    import ray

    items = [{"key": r["key"], "meta": json.dumps(r["meta"], ensure_ascii=False)} for r in rows]
    # One block per source, so that videos spread over all workers.
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


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


def run_ray(config: Config, context: RunContext, paths: list[str], done_source_ids: dict[str, str] | None = None, on_written: Callable[[int], None] = lambda n: None) -> int:
    from pipeline.execution import to_rows
    warn_if_starved(config, context)

    first, *rest = config.stages
    if not paths:
        return 0
    probed_ds = _map(_dataset(source_rows(paths)), first, config, context)
    probed = [row for batch in probed_ds.iter_batches(batch_size=256, batch_format="numpy") for row in to_rows(batch)]
    keep, dups = resolve_duplicates(probed, done_source_ids)
    _record_dedupe(context, len(probed), keep, dups)
    if not keep:
        return 0
    ds = _dataset(keep)
    for name in rest:
        ds = _map(ds, name, config, context)
    written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        written += len(batch["key"])
        on_written(len(batch["key"]))
    return written


__all__ = ["run_loop", "run_ray", "resolve_duplicates", "source_rows", "to_batches"]
