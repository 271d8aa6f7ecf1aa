"""`report OUT.html`: one self-contained HTML page (plots inlined as base64 PNG, no external URL)
of what a folder holds. Every text from the index is untrusted and HTML-escaped."""
from __future__ import annotations

import base64
import datetime
import html
import io
import os
from pathlib import Path
from typing import Any

from shards.browse.stats import gather
from shards.index import Out

TABLE_COLUMNS = ["key", "shard", "source_path", "duration_s", "tempo_bpm", "key_name", "moods", "genres",
                 "instruments", "prompt_source", "prompt"]
TONICS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
FLAT = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#"}
CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1340px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #ddd;padding:6px}
figcaption{font-size:13px;color:#555;text-align:center}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3}td.prompt{max-width:420px}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(name: str, title: str, draw) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if not draw(ax):
        ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="#888", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    img = _png(fig)
    t = html.escape(title)
    return f'<figure class="plot" id="plot-{name}"><img alt="{t}" src="data:image/png;base64,{img}"><figcaption>{t}</figcaption></figure>'


def _hist(edges: list[float], counts: list[int], xlabel: str):
    def draw(ax) -> bool:
        if not sum(counts):
            return False
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge", color="#4c72b0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("clips")
        return True
    return draw


def _bars(counts: dict[str, int], top: int = 20):
    def draw(ax) -> bool:
        items = list(counts.items())[:top][::-1]
        if not items:
            return False
        ax.barh([str(k)[:30] for k, _ in items], [v for _, v in items], color="#55a868")
        ax.set_xlabel("clips")
        ax.tick_params(axis="y", labelsize=8)
        return True
    return draw


def _per_source(cps: dict[str, int]):
    def draw(ax) -> bool:
        if not cps:
            return False
        from matplotlib.ticker import MaxNLocator

        ax.bar([int(k) for k in cps], list(cps.values()), width=0.8, color="#8172b3")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("clips of one source")
        ax.set_ylabel("sources")
        return True
    return draw


def _keys(tonic_mode: dict[str, int]):
    def draw(ax) -> bool:
        import numpy as np

        table = {m: np.zeros(12) for m in ("major", "minor")}
        for label, n in tonic_mode.items():
            tonic, _, mode = label.partition(" ")
            tonic = FLAT.get(tonic, tonic)
            if tonic in TONICS and mode in table:
                table[mode][TONICS.index(tonic)] += n
        if not sum(v.sum() for v in table.values()):
            return False
        x = np.arange(12)
        ax.bar(x - 0.2, table["major"], 0.4, label="major", color="#dd8452")
        ax.bar(x + 0.2, table["minor"], 0.4, label="minor", color="#4c72b0")
        ax.set_xticks(x, TONICS)
        ax.set_ylabel("clips")
        ax.legend(loc="lower right", framealpha=0.9)
        return True
    return draw


def plots(s: dict[str, Any]) -> list[str]:
    cps = s["clips_per_source"]
    rejects = {f"{r['stage']}: {r['reason']}": r["count"] for r in s["rejects"]["by_reason"]}
    words = s["prompt_words"]["counts"]
    return [
        _figure("tempo", "Tempo (BPM)", _hist(s["tempo"]["edges"], s["tempo"]["counts"], "beats per minute")),
        _figure("keys", "Keys by tonic and mode", _keys(s["tonic_mode"])),
        _figure("moods", "Moods", _bars(s["moods"])),
        _figure("genres", "Genres", _bars(s["genres"])),
        _figure("instruments", "Instruments", _bars(s["instruments"])),
        _figure("duration", "Clip duration", _hist(s["duration"]["edges"], s["duration"]["counts"], "seconds")),
        _figure("clips_per_source", "Clips per source", _per_source(cps)),
        _figure("rejects", "Reject reasons", _bars(rejects)),
        _figure("prompt_words", "Prompt length", _hist(list(range(len(words) + 1)), words, "words in the full prompt")),
    ]


def _cell(value: Any) -> str:
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    elif isinstance(value, float):
        value = f"{value:.2f}"
    return html.escape("" if value is None else str(value))


def sample_table(out: Out, n: int) -> str:
    rows = out.index().head(n, columns=TABLE_COLUMNS).to_pylist()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{_cell(r[c])}</td>' for c in TABLE_COLUMNS) + "</tr>" for r in rows)
    return f'<table id="samples"><tr>{head}</tr>{body}</table>'


def render(out: Out, progress: bool = False, sample_rows: int = 50) -> str:
    s = gather(out, progress)
    overview = [("samples", f"{s['rows']:,}"), ("hours", f"{s['hours']:,.2f}"), ("sources", f"{s['sources']:,}"),
                ("shards", f"{s['shards']:,}"), ("with CLIP embeddings", f"{s['has_clip']:,}"),
                ("with VAE latents", f"{s['has_latent']:,}"), ("reject rows", f"{s['rejects']['rows']:,}"),
                ("mean tempo (BPM)", f"{s['tempo']['mean']:.1f}" if s["tempo"]["mean"] is not None else "-"),
                ("runs", html.escape(", ".join(map(str, s["runs"])) or "-"))]
    over = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in overview)
    rej = "".join(f"<tr><td>{_cell(r['level'])}</td><td>{_cell(r['stage'])}</td><td>{_cell(r['reason'])}</td><td>{r['count']:,}</td></tr>"
                  for r in s["rejects"]["by_reason"])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Shard report: {html.escape(out.location)}</title><style>{CSS}</style></head>
<body><h1>Shard report: {html.escape(out.location)}</h1><p>generated {when} by <code>python -m shards.browse</code></p>
<h2>Overview</h2><table id="overview">{over}</table>
<h2>Distributions</h2><div class="grid">{''.join(plots(s))}</div>
<h2>Rejects</h2><table id="rejects"><tr><th>level</th><th>stage</th><th>reason</th><th>count</th></tr>{rej}</table>
<h2>Sample rows (first {sample_rows})</h2>{sample_table(out, sample_rows)}
</body></html>
"""


def run(out: Out, dest: str, progress: bool, sample_rows: int = 50) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    page = render(out, progress, sample_rows)
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
