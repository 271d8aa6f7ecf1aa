"""bench/scale.py's cheap parts: unique sources without re-encoding, and the ratios against the goals."""
from __future__ import annotations

import pyarrow.parquet as pq

from bench import scale


def test_padded_sources_decode_probe_and_differ(tmp_path):
    made = scale.make_sources(tmp_path, scale.BASES + 2)
    assert made["generated"] == scale.BASES + 2
    assert pq.read_table(made["manifest"]).column("path").to_pylist()[1] == str(scale.source_path(tmp_path, 1))
    check = scale.verify_unique(tmp_path)
    assert check["ok"], check
    assert scale.make_sources(tmp_path, scale.BASES + 2)["generated"] == 0  # cached


def test_ratios_judge_the_goals():
    def run(rss, first, per_core):
        return {"driver_peak_rss_mb": rss, "driver_peak_anon_mb": rss / 2, "first_shard_s": first,
                "clips_per_s_per_core": per_core, "build_clips_per_s": per_core * 3}

    r = scale.ratios({1000: run(300, 60, 1.0), 10000: run(400, 62, 0.9)}, {})
    assert r["large"] == 10000 and r["driver_rss"] == 1.333
    assert r["met"] == {"driver_rss": False, "first_shard": True, "per_core_throughput": True}
