"""Browse, check and report on an output folder (a local path or an fsspec URL).

    python -m shards.browse OUT summary [--json]
    python -m shards.browse OUT query [--where EXPR] [--tempo 100:130 --key 'A minor' --mood calm ...]
                                     [--columns a,b] [--limit N] [--format table|jsonl] [--count]
    python -m shards.browse OUT query --sql "SELECT key_name, count(*) FROM idx GROUP BY 1"
    python -m shards.browse OUT show KEY [--json] [--index-only]
    python -m shards.browse OUT export KEY OUTDIR [--from-latent --vae-config C --vae-checkpoint K --vae-preset P]
    python -m shards.browse OUT export-sat DEST [--where EXPR] [--prompt-level LEVEL] [--dtype float32]
    python -m shards.browse OUT verify [--index-only]
    python -m shards.browse OUT report REPORT.html

Exit codes: 0 fine; 1 verify found faults; 2 bad usage, unknown key or column, unreadable input."""
from __future__ import annotations

import argparse
import json
import sys


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", help="filter, e.g. \"tempo_bpm > 120 and 'calm' in moods\" (see shards/browse/where.py)")
    p.add_argument("--tempo", help="LO:HI bpm, either side optional")
    p.add_argument("--key", help="key name, e.g. 'A minor'")
    p.add_argument("--mood", action="append", help="a mood the clip has (repeatable: all must hold)")
    p.add_argument("--genre", action="append")
    p.add_argument("--instrument", action="append")
    p.add_argument("--min-duration", type=float)
    p.add_argument("--max-duration", type=float)
    p.add_argument("--source", help="substring of the source path")
    p.add_argument("--has-latent", action="store_true")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shards.browse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder: a path or an fsspec URL (file://, memory://, s3://, ...)")
    ap.add_argument("--progress", action="store_true", default=None, help="progress bars on stderr (default: on a terminal)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="counts, hours, distributions, reject reasons")
    s.add_argument("--json", action="store_true", help="one JSON object instead of text")
    s.add_argument("--top", type=int, default=10)
    q = sub.add_parser("query", help="rows matching a filter, or a DuckDB SQL query over the view `idx`")
    _filters(q)
    q.add_argument("--sql", help="SELECT ... FROM idx ... (also the view `rejects`)")
    q.add_argument("--columns", help="comma-separated columns (default: a short set for table, all for jsonl)")
    q.add_argument("--limit", type=int)
    q.add_argument("--format", choices=("table", "jsonl"), default="table")
    q.add_argument("--count", action="store_true", help="print only the number of matching rows")
    sh = sub.add_parser("show", help="all metadata and prompts of one sample")
    sh.add_argument("key")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--index-only", action="store_true", help="do not read the json member from the tar")
    e = sub.add_parser("export", help="one sample's audio, thumbnail, json and arrays into a folder")
    e.add_argument("key")
    e.add_argument("dest")
    e.add_argument("--from-latent", action="store_true", help="decode latent.npy to KEY.wav instead of copying the flac")
    e.add_argument("--vae-config")
    e.add_argument("--vae-checkpoint")
    e.add_argument("--vae-preset")
    x = sub.add_parser("export-sat", help="stable-audio-tools pre_encoded layout (latent .npy + .json with the prompt)")
    x.add_argument("dest")
    _filters(x)
    x.add_argument("--prompt-level", help="which prompt level goes into `prompt` (default: the full prompt)")
    x.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    v = sub.add_parser("verify", help="check index, tars, checksums and counts; exit 1 on any fault")
    v.add_argument("--index-only", action="store_true", help="skip reading the tars (huge folders)")
    r = sub.add_parser("report", help="one self-contained HTML file with plots and sample rows")
    r.add_argument("dest")
    r.add_argument("--rows", type=int, default=50, help="sample rows in the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pyarrow.lib import ArrowException

    from shards.browse.show import NoSuchKey
    from shards.browse.where import WhereError
    from shards.index import Out, show_progress

    args.progress = show_progress(args.progress)
    try:
        out = Out(args.out)
        if args.command == "summary":
            from shards.browse import summary

            return summary.run(out, args.json, args.progress, args.top)
        if args.command == "query":
            from shards.browse import query

            args.where_given = query.where_text(args) is not None
            return query.run(out, args)
        if args.command == "show":
            from shards.browse import show

            return show.run(out, args.key, args.json, args.index_only)
        if args.command == "export":
            from shards.browse import export

            for path in export.run(out, args.key, args.dest, args.from_latent, args.vae_config, args.vae_checkpoint, args.vae_preset):
                print(path)
            return 0
        if args.command == "export-sat":
            from shards.browse import query, sat_export

            result = sat_export.run(out, args.dest, query.where_text(args), args.prompt_level, args.dtype, args.progress)
            print(json.dumps(result))
            return 0
        if args.command == "verify":
            from shards.browse import verify

            return verify.run(out, args.index_only, args.progress)
        if args.command == "report":
            from shards.browse import report

            print(report.run(out, args.dest, args.progress, args.rows))
            return 0
    except (NoSuchKey, WhereError, FileNotFoundError, ValueError, TypeError, ArrowException) as exc:
        # 2, never 1: exit 1 is reserved for verify's "faults found".
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
