"""`show KEY`: everything known about one sample: its index row (prompts at every level) and, unless
--index-only, its `json` member read from the tar."""
from __future__ import annotations

import json

from shards.index import Out


class NoSuchKey(LookupError):
    def __init__(self, key: str, location: str):
        super().__init__(f"no sample with key {key!r} in {location}/index")


def lookup(out: Out, key: str) -> dict:
    row = out.find(key)
    if row is None:
        raise NoSuchKey(key, out.location)
    return row


def run(out: Out, key: str, as_json: bool, index_only: bool) -> int:
    row = lookup(out, key)
    meta = None
    if not index_only and "json" in (row.get("members") or []):
        meta = json.loads(out.read_members(row["shard"], key, ["json"])["json"])
    if as_json:
        print(json.dumps({"index": row, "meta": meta}, ensure_ascii=False, default=str))
        return 0
    print(f"== {key}  ({row['shard']})")
    for name, value in row.items():
        if name == "prompts":
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{name:<24} {value if value is not None else '-'}")
    print("prompts:")
    for p in row.get("prompts") or []:
        print(f"  [{p['level']}] {p['text']}")
    if meta is not None:
        print("json member:")
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    return 0
