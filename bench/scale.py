"""How the pipeline holds as the input count grows, on a real 3-node local Ray cluster.

    .venv/bin/python -m bench.scale --sizes 1000 10000 50000 [--writers-size 1000] [--out bench/work/scale]
    [--budget-min 35]  run the smallest size, then the largest sizes whose estimated time still fits
                       (the writers run's time kept aside), then the writers runs; the rest are skipped, said so
    [--with-runs JSON] merge the runs of an earlier invocation; --render JSON: only rewrite the markdown

Inputs: a few tiny synthetic videos (`pipeline.synth`: 2 s, 64x64, 25 fps, stereo AAC), each of the
N sources one of them plus a unique trailing MP4 `free` box (a valid top-level box FFmpeg skips),
so every source has its own content id (stages/probe.py hashes size + three 1 MiB windows) without
re-encoding. clip_seconds=2: every source makes exactly one clip. A parquet manifest (`path`
column) of N rows per size. All of it is cached under --out, so reruns skip generation.

Each build runs as a subprocess driver attached to a fresh `tests/ray_nodes.local_cluster(nodes=3,
cpus_per_node=1)` (a head with 0 CPUs plus 3 worker nodes, each its own raylet and object store)
with the same cheap stage list for every size. Measured per run, from outside the driver:
  driver peak RSS   VmRSS of the driver process plus any children, read from /proc every 0.2 s
                    (RssAnon/RssFile/RssShmem split kept, and RSS at every "[build] chunk" line)
  first shard       seconds from the driver's start to the first OUT/index/*.parquet (a shard's
                    commit point)
  wall              driver start to exit; build() wall from the run record as well
  clips/s           clips written / driver wall (end-to-end), and per worker core (/3)
Writers: the same --writers-size input with writer.workers=1 vs unset (as many as Ray allows);
writer-stage seconds (`stages.writer.seconds` in the run record: busy seconds summed over the
writer tasks) and end-to-end clips/s, as ratios.
Writes bench/results/scale_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.record import save

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
WORK = ROOT / "work" / "scale"
NODES, CPUS_PER_NODE = 3, 1
WORKER_CORES = NODES * CPUS_PER_NODE
BASES = 4  # distinct base videos (seeds); sources cycle through them
BASE_SECONDS, BASE_SIZE, BASE_FPS = 2.0, 64, 25.0
STAGES = "[probe,segment,music_dsp,visual_rhythm,template_prompts,writer]"
SETTINGS = [f"clip_seconds={BASE_SECONDS:g}", f"stages={STAGES}", "runner.progress_bars=false", "writer.samples_per_shard=256",
            "clip_embed.on_missing=skip", "vae_latents.on_missing=skip"]
GOALS = {"driver_rss": "<= 1.2", "first_shard": "~1 (within 1.2x either way)", "per_core_throughput": ">= 0.83 (at most 1.2x slower)"}
POLL_S = 0.2


# --- inputs -----------------------------------------------------------------------------------------

def unique_bytes(base: bytes, i: int) -> bytes:
    """`base` (a complete mp4) plus a top-level `free` box whose payload names source i."""
    payload = b"video-robin bench.scale source %09d" % i
    return base + struct.pack(">I", 8 + len(payload)) + b"free" + payload


def make_bases(work: Path) -> list[Path]:
    from pipeline.synth.media import make_video

    folder = work / "base"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(BASES):
        path = folder / f"base_{k}.mp4"
        if not path.exists():
            tmp = folder / f".base_{k}.tmp.mp4"
            make_video(tmp, seconds=BASE_SECONDS, fps=BASE_FPS, width=BASE_SIZE, height=BASE_SIZE, seed=4242 + k)
            tmp.with_suffix(".json").unlink(missing_ok=True)
            tmp.rename(path)
        paths.append(path)
    return paths


def source_path(work: Path, i: int) -> Path:
    return work / "src" / f"{i // 1000:03d}" / f"s{i:06d}.mp4"


def make_sources(work: Path, n: int) -> dict:
    """Sources 0..n-1 (cached: existing ones are kept) and manifest_<n>.parquet; returns what it did."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    bases = [p.read_bytes() for p in make_bases(work)]
    made = 0
    for i in range(n):
        path = source_path(work, i)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(unique_bytes(bases[i % BASES], i))
        tmp.rename(path)
        made += 1
    manifest = work / f"manifest_{n}.parquet"
    if not manifest.exists() or pq.read_metadata(manifest).num_rows != n:
        pq.write_table(pa.table({"path": [str(source_path(work, i)) for i in range(n)]}), manifest)
    return {"manifest": str(manifest), "sources": n, "generated": made, "seconds": round(time.perf_counter() - t0, 2),
            "bytes_each": [len(b) for b in bases]}


def verify_unique(work: Path) -> dict:
    """A padded source decodes like its base, probes the same, and has its own content id."""
    import av

    from stages.probe import content_id, read_streams

    def frames(path: Path) -> tuple[int, int]:
        with av.open(str(path)) as c:
            v = sum(1 for _ in c.decode(video=0))
        with av.open(str(path)) as c:
            a = sum(f.samples for f in c.decode(audio=0))
        return v, a

    base, one, two = work / "base" / "base_1.mp4", source_path(work, 1), source_path(work, 1 + BASES)
    streams_base, streams_one = read_streams(str(base)), read_streams(str(one))
    ids = {str(p.relative_to(work)): content_id(str(p))[0] for p in (base, one, two)}
    out = {"frames_base": frames(base), "frames_padded": frames(one), "probe_base": streams_base, "probe_padded": streams_one,
           "content_ids": ids}
    out["ok"] = (out["frames_base"] == out["frames_padded"] and streams_base == streams_one and len(set(ids.values())) == 3)
    return out


# --- watching a driver --------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    """VmRSS and its parts (kB) of one process; {} once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    found[key] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    return found


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime seconds) for every live process."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def descendants(pid: int, table: dict[int, tuple[int, float]]) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    found, frontier = [], [pid]
    while frontier:
        frontier = [k for p in frontier for k in kids.get(p, [])]
        found += frontier
    return found


class OtherCPU(threading.Thread):
    """CPU seconds used by processes that are not this benchmark's (not descendants of this process:
    the cluster's raylets and workers and the driver are): other people's work on a shared machine.
    Sampled every second, so short-lived processes are missed."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me, self.ours, self.first, self.last, self.done = os.getpid(), set(), {}, {}, threading.Event()
        self.sample()

    def sample(self) -> None:
        table = _proc_table()
        self.ours.update(descendants(self.me, table), [self.me])
        for pid, (_, cpu) in table.items():
            if pid not in self.ours:
                self.first.setdefault(pid, cpu)
                self.last[pid] = cpu

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def stop(self) -> float:
        self.done.set()
        self.join()
        self.sample()
        return round(sum(v - self.first.get(p, v) for p, v in self.last.items() if p not in self.ours), 1)


def watch(cmd: list[str], env: dict, out: Path, log_path: Path, timeout: float) -> dict:
    """Run the driver; poll its memory (and its children's) and OUT/index until it exits."""
    index = out / "index"
    chunks, timeline = [], []
    peak = {"rss_kb": 0, "driver_rss_kb": 0, "anon_kb": 0, "file_kb": 0, "shmem_kb": 0, "children_max": 0}
    first_shard = None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    current = {"rss_kb": 0}

    def reader() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                t = time.monotonic() - t0
                log.write(f"[{t:8.2f}] {line}")
                log.flush()
                if line.startswith("[build] chunk"):
                    chunks.append({"t": round(t, 2), "rss_mb": round(current["rss_kb"] / 1024, 1), "line": line.strip()})

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    children_seen: set[int] = set()
    next_tree, next_tl, kids = 0.0, 0.0, []
    killed, driver_cpu = False, None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        if now >= next_tree:  # the /proc scan for children, once a second; their RSS every poll
            kids = descendants(proc.pid, _proc_table())
            children_seen.update(kids)
            next_tree = now + 1.0
        mine = _status(proc.pid)
        cpu = _cpu_seconds(proc.pid)
        driver_cpu = cpu if cpu is not None else driver_cpu
        others = [_status(k) for k in kids]
        total = mine.get("VmRSS", 0) + sum(s.get("VmRSS", 0) for s in others)
        current["rss_kb"] = total
        peak["rss_kb"] = max(peak["rss_kb"], total)
        peak["driver_rss_kb"] = max(peak["driver_rss_kb"], mine.get("VmRSS", 0))
        peak["anon_kb"] = max(peak["anon_kb"], mine.get("RssAnon", 0))
        peak["file_kb"] = max(peak["file_kb"], mine.get("RssFile", 0))
        peak["shmem_kb"] = max(peak["shmem_kb"], mine.get("RssShmem", 0))
        peak["children_max"] = max(peak["children_max"], len([s for s in others if s]))
        if first_shard is None:
            try:
                if any(e.name.endswith(".parquet") for e in os.scandir(index)):
                    first_shard = now
            except FileNotFoundError:
                pass
        if now >= next_tl:
            timeline.append([round(now, 1), round(total / 1024, 1), round(mine.get("RssAnon", 0) / 1024, 1)])
            next_tl = now + 2.0
        time.sleep(POLL_S)
    proc.wait()
    wall = time.monotonic() - t0
    thread.join(10)
    return {"rc": proc.returncode, "killed_after_timeout": killed, "process_wall_s": round(wall, 2),
            "first_shard_s": None if first_shard is None else round(first_shard, 2),
            "driver_peak_rss_mb": round(peak["rss_kb"] / 1024, 1), "driver_only_peak_rss_mb": round(peak["driver_rss_kb"] / 1024, 1),
            "driver_peak_anon_mb": round(peak["anon_kb"] / 1024, 1), "driver_peak_file_mb": round(peak["file_kb"] / 1024, 1),
            "driver_peak_shmem_mb": round(peak["shmem_kb"] / 1024, 1), "driver_cpu_s": driver_cpu, "driver_children": len(children_seen),
            "chunks": chunks, "rss_timeline_mb": timeline}


def run_build(name: str, manifest: str, work: Path, extra: list[str], timeout: float) -> dict:
    """One build on a fresh local 3-node cluster; a failure is recorded, not raised."""
    sys.path.insert(0, str(REPO / "tests"))
    from ray_nodes import local_cluster

    out, logs = work / "out" / name, work / "logs"
    shutil.rmtree(out, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    overrides = [*SETTINGS, *extra]
    cmd = [sys.executable, str(REPO / "pipeline" / "build.py"), "--input", manifest, "--output", str(out), *overrides]
    info: dict = {"name": name, "overrides": overrides, "log": shown(logs / f"{name}.log")}
    print(f"[scale] {name}: starting the cluster ({NODES} nodes x {CPUS_PER_NODE} CPU)", flush=True)
    t0 = time.monotonic()
    others = OtherCPU()
    others.start()
    load0 = os.getloadavg()[0]
    with local_cluster(nodes=NODES, cpus_per_node=CPUS_PER_NODE) as cluster:
        info["cluster_start_s"] = round(time.monotonic() - t0, 2)
        print(f"[scale] {name}: cluster up in {info['cluster_start_s']} s; {shlex.join(cmd[1:4])} ...", flush=True)
        info.update(watch(cmd, cluster.driver_env(), out, logs / f"{name}.log", timeout))
    info.update(other_cpu_s=others.stop(), loadavg_start=round(load0, 2), loadavg_end=round(os.getloadavg()[0], 2))
    records = sorted((out / "runs").glob("*.json"))
    if info["rc"] != 0 or not records:
        tail = (logs / f"{name}.log").read_text()[-4000:]
        print(f"[scale] {name}: FAILED (exit {info['rc']}); log tail:\n{tail}", flush=True)
        return {**info, "error": f"exit status {info['rc']}" + (" (killed after timeout)" if info["killed_after_timeout"] else ""),
                "log_tail": tail}
    rec = json.loads(records[-1].read_text())
    c = rec["counts"]
    clips = c["clips_written"]
    stages = {k: {f: round(v, 3) for f, v in st.items()} for k, st in rec["stages"].items()}
    wall = info["process_wall_s"]
    info.update({
        "build_wall_s": rec["wall_seconds"], "inputs": rec["inputs_listed"], "clips_written": clips,
        "shards": rec["shards_written"], "counts_reconcile": c["sources_reconcile"] and c["clips_reconcile"],
        "rejects": rec["rejects"], "stages": stages,
        "clips_per_s": round(clips / wall, 3), "clips_per_s_per_core": round(clips / wall / WORKER_CORES, 3),
        "build_clips_per_s": round(clips / rec["wall_seconds"], 3),
        "writer_seconds": stages.get("writer", {}).get("seconds"),
        "chunking": {k: rec["config"]["runner"][k] for k in ("first_chunk_sources", "chunk_sources", "sources_per_block")},
        "writer_workers": rec["config"]["writer"]["workers"], "writer_num_cpus": rec["config"]["writer"]["num_cpus"],
    })
    print(f"[scale] {name}: {clips} clips in {wall} s ({info['clips_per_s']} clips/s), first shard at {info['first_shard_s']} s, "
          f"driver peak RSS {info['driver_peak_rss_mb']} MB", flush=True)
    return info


# --- results ------------------------------------------------------------------------------------------

def ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b else None


def ratios(runs: dict[int, dict], writers: dict) -> dict:
    ok = {n: r for n, r in runs.items() if "error" not in r}
    if len(ok) < 2:
        out = {"small": None, "large": None}
    else:
        small, large = min(ok), max(ok)
        s, b = ok[small], ok[large]
        out = {"small": small, "large": large,
               "driver_rss": ratio(b["driver_peak_rss_mb"], s["driver_peak_rss_mb"]),
               "driver_anon_rss": ratio(b["driver_peak_anon_mb"], s["driver_peak_anon_mb"]),
               "first_shard": ratio(b["first_shard_s"], s["first_shard_s"]),
               "per_core_throughput": ratio(b["clips_per_s_per_core"], s["clips_per_s_per_core"]),
               "build_throughput": ratio(b["build_clips_per_s"], s["build_clips_per_s"])}
        out["met"] = {"driver_rss": out["driver_rss"] is not None and out["driver_rss"] <= 1.2,
                      "first_shard": out["first_shard"] is not None and 1 / 1.2 <= out["first_shard"] <= 1.2,
                      "per_core_throughput": out["per_core_throughput"] is not None and out["per_core_throughput"] >= 1 / 1.2}
    one, many = writers.get("one", {}), writers.get("many", {})
    if "error" not in one and "error" not in many and one and many:
        out["writers"] = {
            "end_to_end_clips_per_s_many_over_one": ratio(many["clips_per_s"], one["clips_per_s"]),
            "writer_seconds_one_over_many": ratio(one["writer_seconds"], many["writer_seconds"]),
            "writer_clips_per_busy_s_many_over_one": ratio(ratio(many["clips_written"], many["writer_seconds"], 6),
                                                           ratio(one["clips_written"], one["writer_seconds"], 6)),
        }
    return out


def markdown(res: dict) -> str:
    m, r = res["machine"], res["ratios"]
    runs = res["runs"]
    sizes = [int(n) for n in runs]
    yes = lambda k: "n/a" if "met" not in r else ("yes" if r["met"][k] else "**NO**")  # noqa: E731
    lines = [f"# Pipeline at scale: {', '.join(f'{n:,}' for n in sizes)} inputs on a local 3-node Ray cluster", "",
             f"`{res['command']}`", "",
             f"Machine: {m['nproc']} x {m['cpu_model']} (nproc={m['nproc']}), {m['mem_gib']} GiB, shared with other users. "
             f"Cluster: `tests/ray_nodes.local_cluster`: a head with 0 CPUs + {NODES} worker nodes x {CPUS_PER_NODE} CPU, i.e. "
             f"{WORKER_CORES} Ray worker CPUs on a {m['nproc']}-core host (oversubscribed: the CPUs Ray schedules are not real cores, "
             f"and the driver, raylets and object stores share the same {m['nproc']} cores). Commit {res['git']['commit'][:10]}"
             f"{' + uncommitted changes' if res['git']['uncommitted'] else ''}; {res['date']}; whole benchmark "
             f"{res['total_seconds'] / 60:.1f} min.", "",
             f"Inputs: {BASES} synthetic base videos ({BASE_SECONDS:g} s, {BASE_SIZE}x{BASE_SIZE}, {BASE_FPS:g} fps, stereo AAC, "
             f"{res['inputs']['bytes_each']} bytes), each source one of them plus a unique trailing `free` box (no re-encode; "
             f"check: padded file decodes and probes like its base, own content id: {'ok' if res['verify']['ok'] else 'FAILED'}). "
             f"Manifest parquet with a `path` column; every source makes one clip.", "",
             f"Settings for every size: `{' '.join(res['settings'])}`; chunking "
             f"({', '.join(f'{k}={v}' for k, v in res['chunking'].items())}).", ""]
    asked = ", ".join(f"{n:,}" for n in res["sizes_asked"])
    lines += [f"Sizes asked: {asked}" + (f"; budget {res['budget_min']:g} min" if res.get("budget_min") else "")
              + f"; sizes run: {', '.join(f'{n:,}' for n in sizes)}."
              + "".join(f" **{int(n):,} not run** ({why})." for n, why in res["skipped_sizes"].items()), ""]
    if res.get("note"):
        lines += [res["note"], ""]
    cpu_col = any("driver_cpu_s" in v for v in runs.values())
    lines += ["| inputs | clips | shards | wall s (driver) | build() wall s | first shard s | clips/s | clips/s per core | "
              "driver peak RSS MB | of it anon / file / shmem MB (peak each) | " + ("driver CPU s | " if cpu_col else "")
              + "other users' CPU s | load avg start/end |", "|---" * (12 + cpu_col) + "|"]
    for n, v in runs.items():
        if "error" in v:
            lines.append(f"| {int(n):,} | FAILED: {v['error']} (see the JSON's log_tail) | | | | | | | {v['driver_peak_rss_mb']} | | " + "| " * cpu_col +
                         f"{v['other_cpu_s']} | |")
            continue
        lines.append(f"| {int(n):,} | {v['clips_written']:,} | {v['shards']} | {v['process_wall_s']} | {v['build_wall_s']} | "
                     f"{v['first_shard_s']} | {v['clips_per_s']} | {v['clips_per_s_per_core']} | {v['driver_peak_rss_mb']} | "
                     f"{v['driver_peak_anon_mb']} / {v['driver_peak_file_mb']} / {v['driver_peak_shmem_mb']} | " + (f"{v.get('driver_cpu_s', '')} | " if cpu_col else "") +
                     f"{v['other_cpu_s']} | "
                     f"{v['loadavg_start']}/{v['loadavg_end']} |")
    if r.get("large"):
        big, small = f"{r['large']:,}", f"{r['small']:,}"
        lines += ["", f"| ratio ({big} / {small}) | value | goal | met |", "|---|---|---|---|",
                  f"| driver peak RSS | {r['driver_rss']}x | {GOALS['driver_rss']} | {yes('driver_rss')} |",
                  f"| time to first committed shard | {r['first_shard']}x | {GOALS['first_shard']} | {yes('first_shard')} |",
                  f"| end-to-end clips/s per core | {r['per_core_throughput']}x | {GOALS['per_core_throughput']} | "
                  f"{yes('per_core_throughput')} |",
                  f"| (for reference) build() clips/s, start-up excluded | {r['build_throughput']}x | | |",
                  f"| (for reference) driver peak anonymous RSS | {r['driver_anon_rss']}x | | |"]
        missed = [k for k, v in r["met"].items() if not v]
        untested = [int(n) for n in res.get("skipped_sizes", {}) if int(n) > r["large"]]
        between = f" between {small} and {big} inputs" + (f" (not tested at the {max(untested):,} asked for: not run)" if untested else "")
        lines += ["", f"Goals missed{between}: " + ", ".join(missed) + "." if missed else f"All three goals met{between}."]
    else:
        lines += ["", "Fewer than two sizes finished: no ratios."]
    w = res["writers"]
    if w:
        lines += ["", f"Writers, {res['writers_size']:,} inputs (`writer.workers=1` vs unset, as many as Ray allows: "
                  f"{WORKER_CORES} CPUs / writer.num_cpus=0.5, capped by the shards there are):", "",
                  "| writer.workers | wall s | clips/s | writer-stage busy s (summed over tasks) | writer calls | shards |",
                  "|---|---|---|---|---|---|"]
        for label, key in (("1", "one"), ("unset", "many")):
            v = w.get(key, {})
            if "error" in v:
                lines.append(f"| {label} | FAILED: {v['error']} | | | | |")
            elif v:
                lines.append(f"| {label} | {v['process_wall_s']} | {v['clips_per_s']} | {v['writer_seconds']} | "
                             f"{v['stages'].get('writer', {}).get('calls')} | {v['shards']} |")
        if "writers" in r:
            x = r["writers"]
            lines += ["", f"Ratios, unset vs 1 writer: end-to-end clips/s {x['end_to_end_clips_per_s_many_over_one']}x; "
                      f"writer-stage seconds 1 / unset {x['writer_seconds_one_over_many']}x; clips per writer busy second "
                      f"{x['writer_clips_per_busy_s_many_over_one']}x."]
    lines += ["", "Driver RSS at each chunk (seconds from driver start, MB):", ""]
    for n, v in runs.items():
        pts = ", ".join(f"{c['t']:.0f} s: {c['rss_mb']}" for c in v.get("chunks", []))
        lines.append(f"- {int(n):,}: {pts or 'none'}")
    if res.get("observations"):
        lines += ["", *res["observations"]]
    lines += ["", __doc__[__doc__.index("Each build"):__doc__.index("Writes")].strip(), ""]
    return "\n".join(lines)


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--writers-size", type=int, default=1000, help="input count of the writer.workers=1 vs unset comparison (0: skip)")
    ap.add_argument("--out", type=Path, default=WORK, help="work folder: inputs, outputs and logs (cached inputs are reused)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per build before it is killed")
    ap.add_argument("--budget-min", type=float, help="wall-clock budget in minutes: after the smallest size (and the writers "
                    "runs) the largest remaining sizes whose estimated time still fits are run, the rest skipped and said so")
    ap.add_argument("--with-runs", type=Path, help="results JSON of an earlier invocation on this machine: its runs (and "
                    "writers runs) are kept, sizes given here are measured again, the whole is saved as one result")
    ap.add_argument("--render", type=Path, help="only write the markdown again from this results JSON (with --note/--observation)")
    ap.add_argument("--note", default="", help="a paragraph for the markdown (e.g. why a size was left out)")
    ap.add_argument("--observation", action="append", default=[], help="a line for the markdown's end (repeatable)")
    ap.add_argument("--name", default="scale_cpu", help="results name under bench/results/")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run (e.g. runner.sources_per_block=16)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.render:
        res = json.loads(args.render.read_text())
        res["note"] = args.note or res.get("note", "")
        res["observations"] = args.observation or res.get("observations", [])
        save(args.name, res, markdown(res))
        return 0
    from bench.pipeline_throughput import machine

    started = time.monotonic()
    work = args.out.resolve()
    sizes = sorted(set(args.sizes))
    first = sizes[0]
    print(f"[scale] generating {max(first, args.writers_size):,} sources under {work} (larger sizes: when they run)", flush=True)
    inputs = make_sources(work, max(first, args.writers_size))
    manifests: dict[int, str] = {}

    def manifest(n: int) -> str:  # sources are cached and made incrementally, only for sizes that run
        if n not in manifests:
            made = make_sources(work, n)
            inputs["generated"] += made["generated"]
            inputs["seconds"] = round(inputs["seconds"] + made["seconds"], 2)
            manifests[n] = made["manifest"]
            inputs["sources"] = max(inputs["sources"], n)
        return manifests[n]

    verify = verify_unique(work)
    print(f"[scale] inputs ready in {time.monotonic() - started:.0f} s (generated {inputs['generated']}); padded file check: "
          f"{'ok' if verify['ok'] else 'FAILED'}", flush=True)
    budget = args.budget_min * 60 if args.budget_min else None
    runs: dict[int, dict] = {}
    writers: dict = {}
    skipped: dict[int, str] = {}

    def left() -> float:
        return budget - (time.monotonic() - started) if budget else float("inf")

    def estimate(n: int) -> float | None:
        """Seconds a run of n inputs should take: the largest finished run's driver wall scaled
        linearly (its fixed start-up scaled too, so this errs long) plus a cluster start."""
        done = [(m, r) for m, r in [*runs.items(), *([(w_size, writers["one"])] if "one" in writers and w_size else [])]
                if "error" not in r]
        if not done:
            return None
        m, r = max(done, key=lambda x: x[0])
        return r["cluster_start_s"] + 10 + r["process_wall_s"] * n / m + 0.005 * n  # + making the sources

    earlier = json.loads(args.with_runs.read_text()) if args.with_runs else None
    if earlier:  # runs of an earlier invocation on this machine, kept unless measured again here
        runs.update({int(n): r for n, r in earlier["runs"].items() if int(n) not in sizes})
        if earlier.get("writers") and args.writers_size in (0, earlier.get("writers_size")):
            writers.update(earlier["writers"])
    w_size = args.writers_size or (earlier or {}).get("writers_size", 0)

    def writers_reserve() -> float:
        return 0.0 if not args.writers_size or "one" in writers else (estimate(args.writers_size) or 0.0)

    if first not in runs:
        runs[first] = run_build(f"n{first}", manifest(first), work, args.set, args.timeout)
    todo = [n for n in sizes if n not in runs]
    while todo:  # the largest size that still fits the budget (the writers run's time kept aside), then the next largest, ...
        fits = [n for n in todo if (estimate(n) or 0) + writers_reserve() <= left()]
        for n in todo:
            if n not in fits and n not in skipped:
                skipped[n] = (f"estimated {estimate(n):.0f} s (+ {writers_reserve():.0f} s kept for the writers run), "
                              f"{max(left(), 0):.0f} s of the {args.budget_min:g} min budget left")
        if not fits:
            break
        n = max(fits)
        todo = [m for m in todo if m < n]
        runs[n] = run_build(f"n{n}", manifest(n), work, args.set, args.timeout)
        skipped = {m: why for m, why in skipped.items() if m > n}  # smaller sizes: decided again
    for n in todo:
        skipped.setdefault(n, f"estimated {estimate(n):.0f} s, {max(left(), 0):.0f} s of the budget left")
    if args.writers_size and "one" not in writers:
        n = args.writers_size
        writers["many"] = runs[n] if n in runs else run_build(f"n{n}", manifest(n), work, args.set, args.timeout)
        writers["one"] = run_build(f"n{n}_writers1", manifest(n), work, [*args.set, "writer.workers=1"], args.timeout)
    runs = dict(sorted(runs.items()))
    from pipeline.config import Config

    defaults = Config().runner
    command = ".venv/bin/python -m bench.scale " + shlex.join(argv)
    res = {"command": command if not earlier else f"{earlier['command']}` then `{command}",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {**machine(), "cluster": f"{NODES} local nodes x {CPUS_PER_NODE} CPU + head with 0 CPUs"},
           "git": {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--porcelain", "--untracked-files=no").splitlines()},
           "settings": [*SETTINGS, *args.set], "chunking": next((r["chunking"] for r in runs.values() if "chunking" in r), {
               "first_chunk_sources": defaults.first_chunk_sources, "chunk_sources": defaults.chunk_sources,
               "sources_per_block": defaults.sources_per_block}),
           "inputs": {**inputs, "manifests": {str(k): v for k, v in manifests.items()}}, "verify": verify,
           "runs": {str(n): v for n, v in runs.items()}, "sizes_asked": sizes, "budget_min": args.budget_min,
           "skipped_sizes": {str(n): why for n, why in sorted(skipped.items())}, "writers_size": w_size, "writers": writers,
           "goals": GOALS, "note": args.note, "observations": args.observation}
    res["ratios"] = ratios(runs, writers)
    res["total_seconds"] = round(time.monotonic() - started + (earlier or {}).get("total_seconds", 0), 1)
    if earlier:
        res["sizes_asked"] = sorted({*earlier["sizes_asked"], *sizes})
        res["skipped_sizes"] = {n: why for n, why in {**earlier.get("skipped_sizes", {}), **res["skipped_sizes"]}.items() if int(n) not in runs}
        res["earlier_invocation"] = {k: earlier.get(k) for k in ("command", "date", "total_seconds", "git")}
    save(args.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
