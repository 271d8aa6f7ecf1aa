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


def keys_of(out: Path, shard: str) -> list[str]:
    return pq.read_table(out / "index" / shard.replace(".tar", ".parquet"), columns=["key"]).column("key").to_pylist()


def test_clean_output_verifies_in_a_subprocess(copy):
    proc = subprocess.run([sys.executable, "-m", "shards.browse", str(copy), "verify"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: OK: 0 fault(s), 0 warning(s); 2 index files, 6 rows, 2 tars, 2 tars read" in proc.stdout


def test_truncated_tar(copy):
    tar = copy / "shards" / "000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and "FAULT truncated_tar: shards/000001.tar" in text
    rc, text, _ = browse(copy, "verify", "--index-only")  # tars unread: this fault is out of its sight
    assert rc == 0


def test_missing_member(copy):
    key = keys_of(copy, "000000.tar")[1]
    path = copy / "shards" / "000000.tar"
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for info in src:
            if info.name != f"{key}.latent.npy":
                dst.addfile(info, src.extractfile(info))
    path.write_bytes(buf.getvalue())
    rc, text, _ = browse(copy, "verify")
    assert rc == 1
    assert f"FAULT missing_member: {key}: latent.npy listed in the index, absent from shards/000000.tar" in text
    assert "FAULT checksum_mismatch: shards/000000.tar" in text  # the tar is no longer the one written


def test_duplicate_key(copy):
    dup = pq.read_table(copy / "index" / "000000.parquet").slice(0, 1)
    key = dup.column("key")[0].as_py()
    path = copy / "index" / "000001.parquet"
    table = pq.read_table(path)
    dup = dup.set_column(dup.schema.get_field_index("shard"), "shard", pa.array(["000001.tar"]))
    pq.write_table(pa.concat_tables([table, dup.cast(table.schema)]), path)
    rc, text, _ = browse(copy, "verify", "--index-only")
    assert rc == 1 and f"FAULT duplicate_key: {key} appears 2 times (in 000000.tar, 000001.tar)" in text
    rc, text, _ = browse(copy, "verify")
    assert f"FAULT missing_member: {key}:" in text  # the extra row has no sample in 000001.tar


def test_index_row_without_tar(copy):
    (copy / "shards" / "000001.tar").unlink()
    first = keys_of(copy, "000001.tar")[0]
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and f"FAULT missing_tar: shards/000001.tar is missing; {len(keys_of(copy, '000001.tar'))} index row(s) name it, e.g. {first}" in text
    assert "FAULT count_mismatch: shards/ holds 1 recorded tars" in text


def test_orphan_tar_and_counts_that_do_not_reconcile(copy):
    kept = len(keys_of(copy, "000000.tar"))
    (copy / "index" / "000001.parquet").unlink()
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and "FAULT orphan_tar: shards/000001.tar has no index file" in text
    assert f"FAULT count_mismatch: index holds {kept} recorded rows; run" in text


def test_run_record_counts_must_reconcile(copy):
    path, record = run_record(copy)
    record["output_totals"]["rejects"] += 2
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify", "--index-only")
    assert rc == 1 and "FAULT count_mismatch: rejects/ holds 0 rows from recorded runs" in text


def test_checksum_mismatch_against_the_run_record(copy):
    path, record = run_record(copy)
    record["shards"]["000000.tar"]["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and "FAULT checksum_mismatch: shards/000000.tar" in text


def test_shard_of_a_killed_run_is_a_warning_checked_against_its_index_metadata(copy):
    """A run killed after committing 000001 but before writing its record: no fault, a warning; a
    damaged tar of that run is still caught through the checksum in its index file."""
    path, record = run_record(copy)
    gone = record["shards"].pop("000001.tar")
    record["counts"]["clips_written"] -= gone["samples"]
    record["counts"]["clips"] -= gone["samples"]
    record["output_totals"]["samples"] -= gone["samples"]
    record["output_totals"]["shards"] -= 1
    path.write_text(json.dumps(record))
    rc, text, _ = browse(copy, "verify")
    assert rc == 0 and "WARNING 000001.tar is in no run record" in text
    tar = copy / "shards" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # one flipped byte inside the first member's data: the tar still reads
    tar.write_bytes(bytes(data))
    rc, text, _ = browse(copy, "verify")
    assert rc == 1 and "FAULT checksum_mismatch: shards/000001.tar" in text
