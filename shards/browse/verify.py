"""`verify`: is this output folder whole? Exit 1 and name every fault; warnings do not fail.

Faults (kind: what it means):
  missing_tar        index rows name a tar that is not in shards/
  orphan_tar         a tar with no index file (uncommitted; the next build run removes it)
  duplicate_key      one key in more than one index row
  shard_mismatch     an index file's rows do not name its own tar, or their count differs
  truncated_tar      a tar that cannot be read to its end, or shorter than its recorded size
  checksum_mismatch  a tar whose sha256 or size differs from its run record (or index metadata)
  missing_member     an index row lists a member its tar lacks (or the whole sample is absent)
  unindexed_sample   a sample in a tar that no index row names
  count_mismatch     counts in run records, index files, tars and rejects do not reconcile
  missing_shard      a shard a run record lists is gone
A shard in no run record (its run was killed before writing one) is checked against the checksum
in its index file's metadata and reported as a warning. --index-only skips reading the tars."""
from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections import Counter, defaultdict

from shards.index import Out, duckdb_index, progress_bar
from shards.schema import shard_checksum

LIST_AT_MOST = 20


class _HashingReader:
    def __init__(self, f):
        self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self._f.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class Findings:
    def __init__(self):
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.warnings: list[str] = []

    def fault(self, kind: str, text: str) -> None:
        self.faults[kind].append(text)

    def print(self, checked: str) -> None:
        for kind, items in self.faults.items():
            for text in items[:LIST_AT_MOST]:
                print(f"FAULT {kind}: {text}")
            if len(items) > LIST_AT_MOST:
                print(f"FAULT {kind}: ... and {len(items) - LIST_AT_MOST} more")
        for text in self.warnings:
            print(f"WARNING {text}")
        total = sum(len(v) for v in self.faults.values())
        kinds = ", ".join(f"{k} x{len(v)}" for k, v in self.faults.items())
        print(f"verify: {'FAILED' if total else 'OK'}: {total} fault(s){' (' + kinds + ')' if kinds else ''}, "
              f"{len(self.warnings)} warning(s); {checked}")


def _stem(path: str) -> str:
    return posixpath.basename(path).rsplit(".", 1)[0]


def index_checks(out: Out, f: Findings, progress: bool) -> tuple[dict, dict, dict]:
    """Everything decidable from the index files' footers and two DuckDB aggregations."""
    files = {_stem(p): p for p in out.index_files()}
    tars = {_stem(p) + ".tar" for p in out.tar_files()}
    footers = {}
    for stem, path in files.items():
        meta = out.index_metadata(path)
        footers[stem + ".tar"] = {"rows": meta.num_rows, "checksum": shard_checksum(meta.metadata)}
    con = duckdb_index(out, progress)
    dups = con.sql("SELECT key, count(*) AS n, list(DISTINCT shard ORDER BY shard) AS shards FROM idx "
                   "GROUP BY key HAVING count(*) > 1 ORDER BY key").limit(10_000).fetchall()
    for key, n, shards in dups:
        f.fault("duplicate_key", f"{key} appears {n} times (in {', '.join(map(str, shards))})")
    per_shard = dict(con.sql("SELECT shard, count(*) FROM idx GROUP BY shard").fetchall())
    for shard, n in sorted(per_shard.items(), key=lambda kv: str(kv[0])):
        if shard not in tars:
            example = con.execute("SELECT key FROM idx WHERE shard = ? LIMIT 1", [shard]).fetchone()[0]
            f.fault("missing_tar", f"shards/{shard} is missing; {n} index row(s) name it, e.g. {example}")
    for shard, foot in footers.items():
        if per_shard.get(shard, 0) != foot["rows"]:
            f.fault("shard_mismatch", f"index/{_stem(shard)}.parquet has {foot['rows']} rows but {per_shard.get(shard, 0)} name {shard}")
        if foot["checksum"] and foot["checksum"].get("samples") != foot["rows"]:
            f.fault("count_mismatch", f"index/{_stem(shard)}.parquet has {foot['rows']} rows; its metadata says {foot['checksum'].get('samples')}")
    for shard in sorted(tars - set(footers)):
        f.fault("orphan_tar", f"shards/{shard} has no index file (uncommitted)")
    return footers, per_shard, {s: out.path("shards", s) for s in tars}


def record_checks(out: Out, f: Findings, footers: dict, tars: dict) -> dict[str, dict]:
    """Run records against the folder; returns the expected checksum of each shard."""
    records = out.run_records()
    if not records:
        f.warnings.append("no run records in runs/: counts cannot be reconciled")
    recorded: dict[str, dict] = {}
    every_has_map = all("shards" in r for r in records)
    for r in records:
        c, rid = r.get("counts", {}), r.get("run_id")
        if not (c.get("sources_reconcile", True) and c.get("clips_reconcile", True)):
            f.fault("count_mismatch", f"run {rid}: its own counts do not reconcile ({c})")
        shards = r.get("shards")
        if shards is None:
            continue
        if sum(m.get("samples", 0) for m in shards.values()) != c.get("clips_written"):
            f.fault("count_mismatch", f"run {rid} wrote {c.get('clips_written')} clips but its shards hold {sum(m.get('samples', 0) for m in shards.values())}")
        for name, meta in shards.items():
            recorded[name] = {**meta, "run_id": rid}
    if records and not every_has_map:
        f.warnings.append("some run records predate shard checksums: their tars are checked against index metadata only")
    expected: dict[str, dict] = {}
    for shard, foot in footers.items():
        rec, own = recorded.get(shard), foot["checksum"]
        if rec:
            expected[shard] = rec
            if rec.get("samples") != foot["rows"]:
                f.fault("count_mismatch", f"run {rec['run_id']} recorded {rec.get('samples')} samples in {shard}; its index file has {foot['rows']}")
            if own and own.get("sha256") != rec.get("sha256"):
                f.fault("checksum_mismatch", f"{shard}: index metadata and run {rec['run_id']} disagree on its sha256")
        elif own:
            expected[shard] = own
            if every_has_map and records:
                f.warnings.append(f"{shard} is in no run record (its run was killed?); checked against its index file's metadata")
        else:
            f.warnings.append(f"{shard}: no checksum recorded anywhere (written before checksums existed)")
    for shard, rec in sorted(recorded.items()):
        if shard not in footers and shard not in tars:
            f.fault("missing_shard", f"run {rec['run_id']} wrote {shard}, which is gone (no tar, no index file)")
    if records:
        _totals(out, f, records[-1], footers, tars, set(recorded) if every_has_map else set(footers), {r.get("run_id") for r in records})
    return expected


def _totals(out: Out, f: Findings, last: dict, footers: dict, tars: dict, recorded: set, run_ids: set) -> None:
    """The last record's snapshot of the folder must equal the folder less what unrecorded runs added."""
    totals = last.get("output_totals") or {}
    rows = sum(foot["rows"] for s, foot in footers.items() if s in recorded)
    if "samples" in totals and rows != totals["samples"]:
        f.fault("count_mismatch", f"index holds {rows} recorded rows; run {last.get('run_id')} left {totals['samples']}")
    ntars = len([s for s in tars if s in recorded or s not in footers])
    if "shards" in totals and ntars != totals["shards"]:
        f.fault("count_mismatch", f"shards/ holds {ntars} recorded tars; run {last.get('run_id')} left {totals['shards']}")
    rejects = out.rejects()
    by_run = Counter()
    if rejects is not None:
        for row in rejects.to_table(columns=["run_id"]).group_by("run_id").aggregate([("run_id", "count")]).to_pylist():
            by_run[row["run_id"]] = row["run_id_count"]
    unknown = {r: n for r, n in by_run.items() if r not in run_ids}
    if unknown:
        f.warnings.append(f"reject rows from runs with no record (killed?): {unknown}")
    known = sum(n for r, n in by_run.items() if r in run_ids)
    if "rejects" in totals and known != totals["rejects"]:
        f.fault("count_mismatch", f"rejects/ holds {known} rows from recorded runs; run {last.get('run_id')} left {totals['rejects']}")


def tar_checks(out: Out, f: Findings, expected: dict, tars: dict, progress: bool) -> int:
    """Read each tar once (headers and a running sha256) against its index file's keys and members."""
    import pyarrow.parquet as pq

    checked = 0
    indexed = {_stem(p) for p in out.index_files()}
    names = sorted(s for s in tars if _stem(s) in indexed)  # orphans were reported already
    bar = progress_bar(len(names), "tars", "tar", progress)
    for shard in names:
        with out.fs.open(out.path("index", _stem(shard) + ".parquet"), "rb") as fh:
            table = pq.read_table(fh, columns=["key", "members"])
        want = {k: set(m or []) for k, m in zip(table.column("key").to_pylist(), table.column("members").to_pylist())}
        found: dict[str, set[str]] = defaultdict(set)
        with out.fs.open(tars[shard], "rb") as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for info in tar:
                        key, _, member = info.name.partition(".")
                        found[key].add(member)
                reader.drain()
            except (tarfile.TarError, EOFError, OSError) as exc:
                f.fault("truncated_tar", f"shards/{shard} cannot be read past byte {reader.bytes}: {exc}")
                reader.drain()
        exp = expected.get(shard)
        if exp and reader.bytes < exp.get("bytes", 0):
            f.fault("truncated_tar", f"shards/{shard} is {reader.bytes} bytes; {exp['bytes']} were written")
        elif exp and (reader.sha256.hexdigest() != exp.get("sha256") or reader.bytes != exp.get("bytes")):
            f.fault("checksum_mismatch", f"shards/{shard}: sha256 {reader.sha256.hexdigest()[:16]}... != recorded {str(exp.get('sha256'))[:16]}...")
        for key, members in want.items():
            lacking = sorted(members - found.get(key, set()))
            if lacking:
                f.fault("missing_member", f"{key}: {', '.join(lacking)} listed in the index, absent from shards/{shard}")
        for key in sorted(set(found) - set(want)):
            f.fault("unindexed_sample", f"{key} is in shards/{shard} but in no index row of it")
        checked += 1
        bar.update(1)
    bar.close()
    return checked


def run(out: Out, index_only: bool, progress: bool) -> int:
    f = Findings()
    footers, per_shard, tars = index_checks(out, f, progress)
    expected = record_checks(out, f, footers, tars)
    checked = 0 if index_only else tar_checks(out, f, expected, tars, progress)
    rows = sum(foot["rows"] for foot in footers.values())
    f.print(f"{len(footers)} index files, {rows} rows, {len(tars)} tars" + (" (tars not read: --index-only)" if index_only else f", {checked} tars read"))
    return 1 if f.faults else 0
