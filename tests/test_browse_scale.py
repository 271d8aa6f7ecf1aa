"""The browse commands on a synthetic index of one million rows (100 files; bench/browse_scale.py
makes it with known patterns), in this process on 2 cores: the answers are the generator's truth."""
from __future__ import annotations

import json
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.browse_scale import make_synthetic
from shards.browse.stats import COLUMNS, Stats
from shards.index import Out, scan
from test_browse import browse, jsonl

ROWS = 1_000_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("browse-scale") / "out"
    return out, make_synthetic(out, ROWS, 100)


def test_summary_query_sql_show_report_verify_at_a_million_rows(synthetic, tmp_path):
    out, truth = synthetic
    t0 = time.perf_counter()
    rc, text, _ = browse(out, "summary", "--json")
    s = json.loads(text)
    assert rc == 0 and (s["rows"], s["sources"], s["shards"]) == (ROWS, truth["sources"], 100)
    assert s["hours"] == pytest.approx(truth["hours"])
    assert sorted(s["key_name"].items()) == sorted(truth["key_counts"].items())
    assert s["moods"]["calm"] == truth["calm"]
    assert s["clips_per_source"] == {"4": truth["sources"]}
    assert s["rejects"]["rows"] == 1000 and s["rejects"]["by_reason"][0]["reason"] == "no_audio"

    rc, text, _ = browse(out, "query", "--tempo", "100:130", "--count")
    assert int(text) == truth["tempo_100_130"]
    rc, text, _ = browse(out, "query", "--mood", "calm", "--key", "C minor", "--format", "jsonl", "--columns", "key,moods,key_name")
    rows = jsonl(text)
    assert len(rows) == truth["calm_and_c_minor"] > 0 and all("calm" in r["moods"] and r["key_name"] == "C minor" for r in rows)
    rc, text, _ = browse(out, "query", "--sql", "SELECT count(*) AS n FROM idx WHERE list_contains(moods, 'calm')", "--format", "jsonl")
    assert jsonl(text) == [{"n": truth["calm"]}]
    key = rows[0]["key"]
    rc, text, _ = browse(out, "show", key, "--json", "--index-only")
    assert rc == 0 and json.loads(text)["index"]["key"] == key

    rc, _, _ = browse(out, "report", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert rc == 0 and page.count('src="data:image/png;base64,') == 9
    rc, text, _ = browse(out, "verify", "--index-only")
    assert rc == 0 and "verify: OK: 0 fault(s), 0 warning(s); 100 index files, 1000000 rows" in text
    assert time.perf_counter() - t0 < 90


def test_verify_finds_one_duplicate_among_a_million(synthetic, tmp_path):
    out, _ = synthetic
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    last = copy / "index" / "000099.parquet"
    table = pq.read_table(last)
    dup_key = pq.read_table(copy / "index" / "000000.parquet", columns=["key"]).column("key")[5].as_py()
    keys = table.column("key").to_pylist()
    keys[7] = dup_key
    pq.write_table(table.set_column(0, "key", pa.array(keys)).replace_schema_metadata(table.schema.metadata), last)
    rc, text, _ = browse(copy, "verify", "--index-only")
    assert rc == 1 and f"FAULT duplicate_key: {dup_key} appears 2 times (in 000000.tar, 000099.tar)" in text
    assert "verify: FAILED: 1 fault(s) (duplicate_key x1)" in text


def test_a_slow_scan_holds_about_one_file_at_a_time(synthetic):
    """pyarrow's dataset-wide scanner read ahead of a slow consumer without bound (~400 MB of batches
    at 4M rows); scan() goes file by file, so what Arrow holds stays near one file's columns."""
    out, _ = synthetic
    stats, peak = Stats(), 0
    for batch in scan(Out(str(out)).index(), COLUMNS):
        stats.add(batch)
        peak = max(peak, pa.total_allocated_bytes())
    assert stats.rows == ROWS
    assert peak < 32 * 2**20, f"Arrow held {peak / 2**20:.0f} MiB during the scan"
