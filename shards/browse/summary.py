"""`summary`: counts, hours, distributions and reject reasons of one output folder."""
from __future__ import annotations

import json
from typing import Any

from shards.browse.stats import gather
from shards.index import Out


def run(out: Out, as_json: bool, progress: bool, top: int = 10) -> int:
    stats = gather(out, progress)
    print(json.dumps(stats, ensure_ascii=False) if as_json else format_text(stats, top))
    return 0


def _bars(counts: dict[str, int], top: int, width: int = 30) -> list[str]:
    items = list(counts.items())[:top]
    most = max((c for _, c in items), default=0) or 1
    return [f"  {str(k)[:28]:<28} {c:>10,}  {'#' * max(1, round(width * c / most))}" for k, c in items]


def _hist_lines(edges: list[float], counts: list[int], unit: str, group: int) -> list[str]:
    """A histogram regrouped to fewer, wider bins so it fits a terminal."""
    lines, most = [], 0
    rows = []
    for i in range(0, len(counts), group):
        c = sum(counts[i:i + group])
        if c:
            rows.append((f"{edges[i]:g}-{edges[min(i + group, len(edges) - 1)]:g} {unit}", c))
            most = max(most, c)
    for label, c in rows:
        lines.append(f"  {label:<16} {c:>10,}  {'#' * max(1, round(30 * c / most))}")
    return lines or ["  (none)"]


def format_text(s: dict[str, Any], top: int) -> str:
    lines = [
        f"== {s['location']}",
        f"samples          {s['rows']:>12,}",
        f"hours            {s['hours']:>12,.2f}",
        f"sources          {s['sources']:>12,}",
        f"shards           {s['shards']:>12,}",
        f"with CLIP        {s['has_clip']:>12,}",
        f"with latents     {s['has_latent']:>12,}",
        f"runs             {len(s['runs']):>12,}",
    ]
    tempo = s["tempo"]
    mean = f"{tempo['mean']:.1f}" if tempo["mean"] is not None else "-"
    lines += [f"tempo (measured on {tempo['measured']:,}, mean {mean} bpm):", *_hist_lines(tempo["edges"], tempo["counts"], "bpm", 4)]
    lines += ["duration:", *_hist_lines(s["duration"]["edges"], s["duration"]["counts"], "s", 5)]
    for name, title in (("key_name", "keys"), ("mode", "modes"), ("moods", "moods"), ("genres", "genres"),
                        ("instruments", "instruments"), ("energy", "energy"), ("prompt_source", "prompt source"),
                        ("flags", "flags")):
        lines.append(f"{title}:")
        lines += _bars(s[name], top) or ["  (none)"]
    lines.append("clips per source:")
    lines += _bars(s["clips_per_source"], top) or ["  (none)"]
    rej = s["rejects"]
    lines.append(f"rejects: {rej['rows']:,} rows")
    for r in rej["by_reason"][:top * 2]:
        lines.append(f"  {r['level']:<6} {r['stage']:<16} {r['reason']:<24} {r['count']:>10,}")
    return "\n".join(lines)
