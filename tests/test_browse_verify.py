"""`verify` on copies of real pipeline output (`feature_shards`), each damaged one way: every injected
fault is caught, named with its shard or key, and makes the exit code 1."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_browse import ROOT, browse


@pytest.fixture
def copy(feature_shards, tmp_path) -> Path:
    out, _ = feature_shards
    dest = tmp_path / "out"
    shutil.copytree(out, dest)
    return dest


def run_record(out: Path) -> tuple[Path, dict]:
    (path,) = sorted((out / "runs").glob("*.json"))
    return path, json.loads(path.read_text())


def shard_names(out: Path) -> tuple[str, str]:
    """The run's two shards in name order (content-named `<20 hex>.tar`, from the run record)."""
    _, record = run_record(out)
    first, second = sorted(record["shards"])
    return first, second


def index_file(out: Path, shard: str) -> Path:
    return out / "index" / shard.replace(".tar", ".parquet")


def keys_of(out: Path, shard: str) -> list[str]:
    return pq.read_table(index_file(out, shard), columns=["key"]).column("key").to_pylist()


def test_clean_output_verifies_in_a_subprocess(copy):
    proc = subprocess.run([sys.executable, "-m", "shards.browse", str(copy), "verify"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: OK: 0 fault(s), 0 warning(s); 2 index files, 6 rows, 2 tars, 2 tars read" in proc.stdout


def test_truncated_tar(copy):
    _, second = shard_names(copy)
    tar = copy / "shards" / second
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT truncated_tar: shards/{second}" in text
    rc, text, _ = browse(copy, "verify", "--index-only")  # tars unread: this fault is out of its sight
    assert rc == 0


def test_missing_member(copy):
    first, _ = shard_names(copy)
    key = keys_of(copy, first)[1]
    path = copy / "shards" / first
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for info in src:
            if info.name != f"{key}.latent.npy":
                dst.addfile(info, src.extractfile(info))
    # Zero-padded back to the size written (tar readers stop at the first zero block): a shorter
    # tar is reported as truncated_tar instead, and whether dropping one member shrinks it depends
    # on where the shard's end falls in tar's 10 KiB records, so on which shard sorts first by name.
    data = buf.getvalue()
    path.write_bytes(data + b"\0" * max(0, path.stat().st_size - len(data)))
    rc, text, _ = browse(copy, "verify")
    assert rc == 1
    assert f"FAULT missing_member: {key}: latent.npy listed in the index, absent from shards/{first}" in text
    assert f"FAULT checksum_mismatch: shards/{first}" in text  # the tar is no longer the one written
    assert "truncated_tar" not in text


def test_duplicate_key(copy):
    first, second = shard_names(copy)
    dup = pq.read_table(index_file(copy, first)).slice(0, 1)
    key = dup.column("key")[0].as_py()
    path = index_file(copy, second)
    table = pq.read_table(path)
    dup = dup.set_column(dup.schema.get_field_index("shard"), "shard", pa.array([second]))
    pq.write_table(pa.concat_tables([table, dup.cast(table.schema)]), path)
    rc, text, _ = browse(copy, "verify", "--index-only")
    assert rc == 1 and f"FAULT duplicate_key: {key} appears 2 times (in {first}, {second})" in text
    rc, text, _ = browse(copy, "verify")
    assert f"FAULT missing_member: {key}:" in text  # the extra row has no sample in the second tar


def test_index_row_without_tar(copy):
    _, second = shard_names(copy)
    (copy / "shards" / second).unlink()
    first = keys_of(copy, second)[0]
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT missing_tar: shards/{second} is missing; {len(keys_of(copy, second))} index row(s) name it, e.g. {first}" in text
    assert "FAULT count_mismatch: shards/ holds 1 recorded tars" in text


def test_orphan_tar_and_counts_that_do_not_reconcile(copy):
    first, second = shard_names(copy)
    kept = len(keys_of(copy, first))
    index_file(copy, second).unlink()
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT orphan_tar: shards/{second} has no index file" in text
    assert f"FAULT count_mismatch: index holds {kept} recorded rows; run" in text


def test_run_record_counts_must_reconcile(copy):
    path, record = run_record(copy)
    record["output_totals"]["rejects"] += 2
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify", "--index-only")
    assert rc == 1 and "FAULT count_mismatch: rejects/ holds 0 rows from recorded runs" in text


def test_checksum_mismatch_against_the_run_record(copy):
    first, _ = shard_names(copy)
    path, record = run_record(copy)
    record["shards"][first]["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT checksum_mismatch: shards/{first}" in text


def test_shard_of_a_killed_run_is_a_warning_checked_against_its_index_metadata(copy):
    """A run killed after committing its second shard but before writing its record: no fault, a
    warning; a damaged tar of that run is still caught through the checksum in its index file."""
    _, second = shard_names(copy)
    path, record = run_record(copy)
    gone = record["shards"].pop(second)
    record["counts"]["clips_written"] -= gone["samples"]
    record["counts"]["clips"] -= gone["samples"]
    record["output_totals"]["samples"] -= gone["samples"]
    record["output_totals"]["shards"] -= 1
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify")
    assert rc == 0 and f"WARNING {second} is in no run record" in text
    tar = copy / "shards" / second
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # one flipped byte inside the first member's data: the tar still reads
    tar.write_bytes(bytes(data))
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT checksum_mismatch: shards/{second}" in text
