"""Curate a folder (glob, manifest, URL) of videos into WebDataset shards.

    python pipeline/build.py --input VIDEOS --output OUT [--config FILE|NAME] [key=value ...]

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it attaches to the
cluster. Re-running with the same OUT resumes: finished sources and clips are skipped."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.console import RunBar, quiet_ray  # noqa: E402
from pipeline.carry import merge  # noqa: E402
from pipeline.llm.serving import start_servers  # noqa: E402
from pipeline.ownership import claim  # noqa: E402
from pipeline.preflight import prepare_stages  # noqa: E402
from pipeline.progress import Progress, clean_uncommitted, committed_metadata  # noqa: E402
from pipeline.sources import list_sources  # noqa: E402
from pipeline.stage import RunContext  # noqa: E402
from pipeline.storage import Storage, StorageError  # noqa: E402
from pipeline.summary import format_summary, reconcile  # noqa: E402
from pipeline.weights import WeightsMissing  # noqa: E402
from pipeline.worker_env import apply_here, worker_env  # noqa: E402

PACKAGES = ("ray", "torch", "open_clip_torch", "diffusers", "numpy", "pyarrow", "webdataset", "decord", "av", "scenedetect-headless", "librosa", "mir_eval", "pydantic")
NAMESPACE = "video-robin"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def init_ray(config: Config, verbose: bool = False) -> str:
    import logging

    import ray

    if not verbose:
        quiet_ray()

    address = config.runner.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers' own output reaches this console only with --verbose (a stage's failure still comes
    # back as an exception or a reject; librosa's per-clip warnings and Ray's worker logs do not).
    common = dict(namespace=NAMESPACE, logging_level=logging.INFO if verbose else logging.WARNING,
                  log_to_driver=verbose, runtime_env={"env_vars": worker_env()})
    if ray.is_initialized():  # a caller (tests, notebooks) brought its own
        where = "the current Ray session"
    elif address:
        ray.init(address=address, **common)
        where = address
    else:
        ray.init(address="local", num_cpus=config.runner.num_cpus, include_dashboard=False, **common)
        where = "embedded local Ray"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose and config.runner.progress_bars  # Ray Data's bars, one per operator
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    return where


def build(input_location: str, output_dir: str, config: Config, quiet: bool = False, verbose: bool = False) -> dict:
    """Run the pipeline; returns the run record (also written to OUT/runs/<run_id>.json). `quiet`:
    print nothing; `verbose`: Ray's logs, Ray Data's bars and a line per chunk as well."""
    started = time.time()
    config, skipped = prepare_stages(config)  # before anything is written: a missing model fails fast
    if skipped and not quiet:
        for name, why in skipped.items():
            print(f"[build] SKIPPING stage {name}: {why}", flush=True)
    if "prompt_fusion" in config.stages and not (config.llm.endpoint or config.llm.serve) and not quiet:
        print("[build] prompt_fusion: no llm.endpoint configured (nor llm.serve): prompts come from the "
              f"template composer ({config.prompts.template}), flagged llm_fallback=no_endpoint", flush=True)
    engine = config.runner.engine
    apply_here()
    where = init_ray(config, verbose) if engine == "ray" else "this process"
    config, servers = start_servers(config, use_ray=engine == "ray", quiet=quiet)
    try:
        return _build(input_location, output_dir, config, skipped, servers, started, where, quiet, verbose)
    finally:
        servers.stop()


def _build(input_location: str, output_dir: str, config: Config, skipped: dict, servers, started: float, where: str, quiet: bool,
           verbose: bool) -> dict:
    import shutil
    import tempfile

    import pyarrow as pa

    storage = Storage(output_dir)
    storage.makedirs("shards", "index", "rejects", "runs", "probe")
    storage.check_writable()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    claim(storage, run_id)
    removed = clean_uncommitted(storage)
    workdir = tempfile.mkdtemp(prefix=f"video-robin-{run_id}-")
    progress = Progress(storage, workdir)
    try:
        paths = list_sources(input_location, config.sources.extensions, config.sources.recursive)
        plan = progress.plan(pa.table({"path": pa.array(paths, pa.string()), "input_index": pa.array(range(len(paths)), pa.int64())}))
        del paths  # the inputs live in DuckDB (on disk) from here on
        context = RunContext(storage.location if not storage.local else storage.root, run_id, done_keys=plan.partial_keys)
        if not quiet:
            print(f"[build] {plan.inputs} inputs, {plan.inputs - plan.todo} already finished; running {len(config.stages)} "
                  f"stages on {where}; writing to {storage.location}", flush=True)

        from pipeline.runner import run_loop, run_ray

        runner = run_ray if config.runner.engine == "ray" else run_loop
        bar = RunBar(plan.todo, enabled=not quiet and config.runner.progress_bars, silent=quiet)
        try:
            run = runner(config, context, storage, progress, bar, verbose=verbose and not quiet)
        finally:
            bar.close()
        outcome = progress.reconcile(run_id)
        checksums, stats = committed_metadata(storage, run_id, outcome["shards"])
        stats = merge(stats, run.probe_stats)
        counters = stats.pop("counters", {})
        order = [config.stages[0], "dedupe", *config.stages[1:]]
        stages = {k: stats[k] for k in sorted(stats, key=lambda k: order.index(k) if k in order else len(order))}
        counts = reconcile(plan.todo, run.counts, outcome)
        record = {
            "run_id": run_id,
            "engine": config.runner.engine,
            "where": where,
            "input": input_location,
            "output_dir": storage.location,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_seconds": round(time.time() - started, 3),
            "inputs_listed": plan.inputs,
            "inputs_skipped": plan.inputs - plan.todo,
            "resumed_partial_clips": len(plan.partial_keys),
            "temporaries_removed": removed,
            "counts": counts,
            "shards_written": len(outcome["shards"]),
            "shards": checksums,
            "rejects": outcome["reasons"],
            "stages": stages,
            "counters": counters,
            "skipped_stages": skipped,
            "llm_servers": servers.describe(),
            "config": config.model_dump(),
            "versions": versions(),
            "output_totals": progress.totals(),
        }
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)
    storage.put_bytes(f"runs/{run_id}.json", json.dumps(record, indent=2, ensure_ascii=False).encode())
    if not quiet:
        print(format_summary(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder, glob, manifest (.parquet/.jsonl/.csv) or file; local or fsspec URL")
    parser.add_argument("--output", required=True, help="output folder (shards/, index/, rejects/, runs/, probe/): local, s3:// or gs://")
    parser.add_argument("--config", help="YAML file or preset name in pipeline/configs/")
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs, Ray Data's per-operator bars and a line per chunk")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. writer.samples_per_shard=64")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except Exception as exc:
        parser.error(f"bad configuration: {exc}")
    try:
        record = build(args.input, args.output, config, verbose=args.verbose)
    except WeightsMissing as exc:
        print(f"[build] ERROR: {exc}", file=sys.stderr)
        return 3
    except StorageError as exc:
        print(f"[build] ERROR: {exc}", file=sys.stderr)
        return 3
    c = record["counts"]
    if not (c["sources_reconcile"] and c["clips_reconcile"]):
        print("[build] ERROR: counts do not reconcile; see the run record", file=sys.stderr)
        return 2
    if c["deferred_sources"]:
        print(f"[build] {c['deferred_sources']} inputs hit transient I/O errors that outlasted the retries; "
              "run the same command again to retry them", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
