"""One streaming pass over the index that gathers every distribution `summary` and `report` show.

Only the columns below are read, batch by batch; what is kept is fixed-size histograms and counts
of distinct values (sources, keys, moods, ...), never the rows."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.index import Out, duckdb_index, scan

COLUMNS = ["shard", "duration_s", "tempo_bpm", "key_name", "tonic", "mode", "moods", "genres",
           "instruments", "energy", "prompt", "prompt_source", "has_clip", "has_latent", "flags"]
TEMPO_EDGES = np.arange(40, 221, 5.0)  # bpm; values outside land in the first/last bin
DURATION_EDGES = np.arange(0, 61, 1.0)  # seconds
PROMPT_WORDS_MAX = 80
COUNTED = ("shard", "key_name", "tonic_mode", "mode", "energy", "prompt_source", "moods", "genres", "instruments", "flags")


class Stats:
    def __init__(self):
        self.rows = 0
        self.seconds = 0.0
        self.tempo = np.zeros(len(TEMPO_EDGES) - 1, dtype=np.int64)
        self.tempo_sum, self.tempo_n = 0.0, 0
        self.duration = np.zeros(len(DURATION_EDGES) - 1, dtype=np.int64)
        self.prompt_words = np.zeros(PROMPT_WORDS_MAX + 1, dtype=np.int64)
        self.counts: dict[str, Counter] = {name: Counter() for name in COUNTED}
        self.has = Counter()

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        self.rows += n
        dur = batch.column("duration_s").to_numpy(zero_copy_only=False)
        dur = dur[~np.isnan(dur)] if dur.dtype.kind == "f" else dur
        self.seconds += float(dur.sum())
        self.duration += _hist(dur, DURATION_EDGES)
        tempo = batch.column("tempo_bpm").to_numpy(zero_copy_only=False).astype(float)
        tempo = tempo[~np.isnan(tempo)]
        self.tempo += _hist(tempo, TEMPO_EDGES)
        self.tempo_sum, self.tempo_n = self.tempo_sum + float(tempo.sum()), self.tempo_n + len(tempo)
        prompt = batch.column("prompt")
        words = pc.count_substring_regex(prompt.fill_null(""), pattern=r"\S+").to_numpy(zero_copy_only=False)
        self.prompt_words += np.bincount(np.minimum(words, PROMPT_WORDS_MAX), minlength=PROMPT_WORDS_MAX + 1)
        for name in ("shard", "key_name", "mode", "energy", "prompt_source"):
            _count(self.counts[name], batch.column(name))
        _count(self.counts["tonic_mode"], pc.binary_join_element_wise(batch.column("tonic"), batch.column("mode"), " "))
        for name in ("moods", "genres", "instruments", "flags"):
            _count(self.counts[name], pc.list_flatten(batch.column(name)))
        for name in ("has_clip", "has_latent"):
            self.has[name] += int(pc.sum(batch.column(name).fill_null(False).cast(pa.int64())).as_py() or 0)

    def to_dict(self, top: int = 25) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "hours": self.seconds / 3600,
            "shards": len(self.counts["shard"]),
            "has_clip": self.has["has_clip"],
            "has_latent": self.has["has_latent"],
            "tempo": {"edges": TEMPO_EDGES.tolist(), "counts": self.tempo.tolist(), "measured": self.tempo_n,
                      "mean": self.tempo_sum / self.tempo_n if self.tempo_n else None},
            "duration": {"edges": DURATION_EDGES.tolist(), "counts": self.duration.tolist()},
            "prompt_words": {"counts": self.prompt_words.tolist(), "capped_at": PROMPT_WORDS_MAX},
            **{name: dict(self.counts[name].most_common(None if name in ("tonic_mode", "mode") else top))
               for name in COUNTED if name != "shard"},
        }


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Out-of-range values are clipped into the end bins rather than silently dropped.
    clipped = np.clip(values, edges[0], edges[-1] - 1e-9)
    return np.histogram(clipped, bins=edges)[0]


def _count(counter: Counter, values) -> None:
    vc = pc.value_counts(values)
    for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        if v is not None and v != "":
            counter[v] += c


def reject_counts(out: Out) -> dict[str, Any]:
    """Reject rows by (level, stage, reason), streamed from OUT/rejects."""
    rejects = out.rejects()
    counts: Counter = Counter()
    if rejects is not None:
        for batch in scan(rejects, ["level", "stage", "reason"]):
            table = pa.Table.from_batches([batch]).group_by(["level", "stage", "reason"]).aggregate([("reason", "count")])
            for row in table.to_pylist():
                counts[(row["level"], row["stage"], row["reason"])] += row["reason_count"]
    rows = [{"level": l, "stage": s, "reason": r, "count": n} for (l, s, r), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return {"rows": sum(counts.values()), "by_reason": rows}


def clips_per_source(out: Out) -> dict[str, int]:
    """{clips: sources with that many}. DuckDB's GROUP BY spills to disk past its memory limit, so
    tens of millions of distinct sources never become a Python dict."""
    rows = duckdb_index(out).sql("SELECT n, count(*) FROM (SELECT count(*) AS n FROM idx GROUP BY source_id) GROUP BY n ORDER BY n").fetchall()
    return {str(n): c for n, c in rows}


def gather(out: Out, progress: bool = False) -> dict[str, Any]:
    stats = Stats()
    for batch in scan(out.index(), COLUMNS, progress=progress, desc="index"):
        stats.add(batch)
    per_source = clips_per_source(out)
    runs = out.run_records()
    return {"location": out.location, **stats.to_dict(), "sources": sum(per_source.values()),
            "clips_per_source": per_source, "rejects": reject_counts(out), "runs": [r.get("run_id") for r in runs]}
