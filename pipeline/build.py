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
from pipeline.ledger import Ledger, LedgerClient  # noqa: E402
from pipeline.llm.serving import start_servers  # noqa: E402
from pipeline.ownership import claim  # noqa: E402
from pipeline.preflight import prepare_stages  # noqa: E402
from pipeline.resume import clean_temporaries, scan  # noqa: E402
from pipeline.sources import list_sources  # noqa: E402
from pipeline.stage import RunContext  # noqa: E402
from pipeline.summary import format_summary, reconcile  # noqa: E402
from pipeline.weights import WeightsMissing  # noqa: E402

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


def init_ray(config: Config) -> str:
    import logging

    import ray

    address = config.runner.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():  # a caller (tests, notebooks) brought its own
        where = "the current Ray session"
    elif address:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
        where = address
    else:
        ray.init(address="local", num_cpus=config.runner.num_cpus, include_dashboard=False, namespace=NAMESPACE, logging_level=logging.WARNING)
        where = "embedded local Ray"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.runner.progress_bars
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    return where


def output_totals(out: Path) -> dict[str, int]:
    import pyarrow.dataset as pads

    def rows(folder: str) -> int:
        files = [str(p) for p in sorted((out / folder).glob("*.parquet")) if not p.name.startswith(".")]
        return pads.dataset(files).count_rows() if files else 0

    return {"samples": rows("index"), "rejects": rows("rejects"), "shards": len(list((out / "shards").glob("*.tar")))}


def shard_checksums(out: Path, first: int, stop: int) -> dict[str, dict]:
    """{shard name: {sha256, bytes, samples}} of the shards this run committed (read from the
    metadata of their index files, the commit point; a named shard never committed is absent)."""
    import pyarrow.parquet as pq

    from shards.schema import shard_checksum

    shards = {}
    for i in range(first, stop):
        path = out / "index" / f"{i:06d}.parquet"
        if path.exists():
            meta = shard_checksum(pq.read_schema(path).metadata)
            if meta:
                shards[meta.pop("shard")] = meta
    return shards


def build(input_location: str, output_dir: str, config: Config, quiet: bool = False) -> dict:
    """Run the pipeline; returns the run record (also written to OUT/runs/<run_id>.json)."""
    started = time.time()
    config, skipped = prepare_stages(config)  # before anything is written: a missing model fails fast
    if skipped and not quiet:
        for name, why in skipped.items():
            print(f"[build] SKIPPING stage {name}: {why}", flush=True)
    if "prompt_fusion" in config.stages and not (config.llm.endpoint or config.llm.serve) and not quiet:
        print("[build] prompt_fusion: no llm.endpoint configured (nor llm.serve): prompts come from the "
              f"template composer ({config.prompts.template}), flagged llm_fallback=no_endpoint", flush=True)
    engine = config.runner.engine
    where = init_ray(config) if engine == "ray" else "this process"
    config, servers = start_servers(config, use_ray=engine == "ray", quiet=quiet)
    try:
        return _build(input_location, output_dir, config, skipped, servers, started, where, quiet)
    finally:
        servers.stop()


def _build(input_location: str, output_dir: str, config: Config, skipped: dict, servers, started: float, where: str, quiet: bool) -> dict:
    out = Path(output_dir)
    for folder in ("shards", "index", "rejects", "runs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    claim(out, run_id)
    removed = clean_temporaries(out)
    progress = scan(out)
    paths = list_sources(input_location, config.sources.extensions, config.sources.recursive)
    todo = [p for p in paths if p not in progress.done_paths]
    engine = config.runner.engine
    if engine == "ray":
        import ray

        actor = ray.remote(num_cpus=0)(Ledger).options(name=f"ledger-{run_id}", namespace=NAMESPACE).remote(
            str(out), run_id, progress.reject_idents, progress.next_shard
        )
        client = LedgerClient(actor, f"ledger-{run_id}", NAMESPACE)
    else:
        ledger = Ledger(str(out), run_id, progress.reject_idents, progress.next_shard)
        client = LedgerClient(ledger)
    context = RunContext(str(out), run_id, client, done_keys=frozenset(progress.partial_keys))
    if not quiet:
        print(f"[build] {len(paths)} inputs, {len(paths) - len(todo)} already finished; running {len(config.stages)} stages on {where}", flush=True)

    from pipeline.runner import run_loop, run_ray

    runner = run_ray if engine == "ray" else run_loop
    written = runner(config, context, todo, progress.done_source_ids)
    if engine == "ray":
        import ray

        snapshot = ray.get(actor.finish.remote())
    else:
        snapshot = ledger.finish()
    order = [config.stages[0], "dedupe", *config.stages[1:]]
    snapshot["stages"] = {k: snapshot["stages"][k] for k in sorted(snapshot["stages"], key=lambda k: order.index(k) if k in order else len(order))}
    counts = reconcile(snapshot, len(todo), written)
    record = {
        "run_id": run_id,
        "engine": engine,
        "where": where,
        "input": input_location,
        "output_dir": str(out),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 3),
        "inputs_listed": len(paths),
        "inputs_skipped": len(paths) - len(todo),
        "resumed_partial_clips": len(progress.partial_keys),
        "temporaries_removed": removed,
        "counts": counts,
        "shards_written": snapshot["shards_named"] - progress.next_shard,
        "shards": shard_checksums(out, progress.next_shard, snapshot["shards_named"]),
        "rejects": snapshot["reasons"],
        "stages": snapshot["stages"],
        "counters": snapshot["counters"],
        "skipped_stages": skipped,
        "llm_servers": servers.describe(),
        "config": config.model_dump(),
        "versions": versions(),
        "output_totals": output_totals(out),
    }
    (out / "runs" / f"{run_id}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    if not quiet:
        print(format_summary(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder, glob, manifest (.parquet/.jsonl/.csv) or file; local or fsspec URL")
    parser.add_argument("--output", required=True, help="output folder (shards/, index/, rejects/, runs/)")
    parser.add_argument("--config", help="YAML file or preset name in pipeline/configs/")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. writer.samples_per_shard=64")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except Exception as exc:
        parser.error(f"bad configuration: {exc}")
    try:
        record = build(args.input, args.output, config)
    except WeightsMissing as exc:
        print(f"[build] ERROR: {exc}", file=sys.stderr)
        return 3
    c = record["counts"]
    if not (c["sources_reconcile"] and c["clips_reconcile"]):
        print("[build] ERROR: counts do not reconcile; see the run record", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
