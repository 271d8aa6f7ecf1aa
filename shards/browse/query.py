"""`query`: rows of the index matching a --where filter (or a DuckDB --sql query), as a table or
JSON lines on stdout. Rows stream batch by batch; nothing but the output is held."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import pyarrow as pa

from shards.browse.where import Where
from shards.index import Out, duckdb_index, scan

TABLE_COLUMNS = ["key", "shard", "duration_s", "tempo_bpm", "key_name", "moods", "prompt"]
TABLE_DEFAULT_LIMIT = 20


def where_text(args) -> str | None:
    """--where plus the convenience flags, joined with `and` (values quoted by repr, parsed by ast)."""
    terms = [f"({args.where})"] if args.where else []
    if args.tempo:
        lo, _, hi = args.tempo.partition(":")
        terms += [f"tempo_bpm >= {float(lo)}"] if lo else []
        terms += [f"tempo_bpm <= {float(hi)}"] if hi else []
    if args.key:
        terms.append(f"key_name == {args.key!r}")
    for mood in args.mood or []:
        terms.append(f"{mood!r} in moods")
    for genre in args.genre or []:
        terms.append(f"{genre!r} in genres")
    for inst in args.instrument or []:
        terms.append(f"{inst!r} in instruments")
    if args.min_duration is not None:
        terms.append(f"duration_s >= {float(args.min_duration)}")
    if args.max_duration is not None:
        terms.append(f"duration_s <= {float(args.max_duration)}")
    if args.source:
        terms.append(f"contains(source_path, {args.source!r})")
    if args.has_latent:
        terms.append("has_latent == True")
    return " and ".join(terms) or None


def filtered(out: Out, where: str | None, columns: list[str], progress: bool = False,
             files: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` of the rows matching `where` (in `files`, default every index file)."""
    dataset = out.index(files)
    schema = dataset.schema
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; columns are: {', '.join(schema.names)}")
    if not where:
        yield from scan(dataset, columns, progress=progress, desc="query")
        return
    w = Where(where, schema)
    read = list(dict.fromkeys([*columns, *w.columns]))
    for batch in scan(dataset, read, filter=w.expression, progress=progress, desc="query"):
        if not w.complete:
            batch = batch.filter(w.mask(batch))
        if batch.num_rows:
            yield batch.select(columns)


def sql_batches(out: Out, sql: str) -> Iterator[pa.RecordBatch]:
    """DuckDB over the same parquet files: the index is the view `idx` (`rejects` too, if any)."""
    import duckdb

    con = duckdb_index(out)
    try:
        reader = con.sql(sql).to_arrow_reader(64 * 1024)
    except duckdb.Error as exc:
        raise ValueError(f"SQL failed: {exc}") from None
    yield from reader


def limited(batches: Iterator[pa.RecordBatch], limit: int | None) -> Iterator[pa.RecordBatch]:
    left = limit
    for batch in batches:
        if left is not None:
            batch = batch.slice(0, left)
            left -= batch.num_rows
        if batch.num_rows:
            yield batch
        if left is not None and left <= 0:
            return


def _json_default(value: Any):
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def write_jsonl(batches: Iterator[pa.RecordBatch], stream=None) -> int:
    stream, n = stream or sys.stdout, 0
    for batch in batches:
        for row in batch.to_pylist():
            stream.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def write_table(batches: Iterator[pa.RecordBatch], stream=None) -> int:
    import pandas as pd

    stream = stream or sys.stdout
    batches = list(batches)
    if not batches:
        stream.write("(no rows)\n")
        return 0
    frame = pa.Table.from_batches(batches).to_pandas()
    with pd.option_context("display.max_colwidth", 60, "display.width", 200, "display.max_columns", 50):
        stream.write(frame.to_string(index=False) + "\n")
    return len(frame)


def run(out: Out, args) -> int:
    if args.sql:
        if args.where_given:
            raise ValueError("--sql takes the filter in its WHERE clause; do not combine it with --where or filter flags")
        batches = sql_batches(out, args.sql)
    else:
        columns = args.columns.split(",") if args.columns else (TABLE_COLUMNS if args.format == "table" else out.index().schema.names)
        batches = filtered(out, where_text(args), columns, args.progress)
    if args.count:
        print(sum(b.num_rows for b in batches))
        return 0
    limit = args.limit if args.limit is not None else (TABLE_DEFAULT_LIMIT if args.format == "table" else None)
    batches = limited(batches, limit)
    n = write_jsonl(batches) if args.format == "jsonl" else write_table(batches)
    if args.format == "table" and args.limit is None and n == TABLE_DEFAULT_LIMIT:
        print(f"(first {n} rows; --limit N for more, --format jsonl for all)", file=sys.stderr)
    return 0
