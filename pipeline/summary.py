"""The end-of-run accounting: counts that must reconcile, rejects by reason, time per stage."""
from __future__ import annotations

from typing import Any


def reconcile(todo: int, run: dict[str, int], outcome: dict[str, Any]) -> dict[str, Any]:
    """This run's counts, from what it committed, with the two invariants checked: every input is
    accepted, rejected or deferred (retryable), and every clip of an accepted source is committed
    once, as a sample or a clip reject, with no key twice."""
    rejected = run["probe_rejected"] + run["duplicates"] + outcome["rejected_in_stream"]
    deferred = run["probe_deferred"] + outcome["deferred_in_stream"]
    accepted = outcome["accepted"]
    written, clip_rejects = outcome["clips_written"], outcome["clips_rejected"]
    return {
        "inputs_to_process": todo,
        "accepted_sources": accepted,
        "rejected_sources": rejected,
        "deferred_sources": deferred,
        "unaccounted_sources": outcome["unaccounted"],
        "clips": written + clip_rejects,
        "clips_written": written,
        "clips_rejected": clip_rejects,
        "incomplete_sources": outcome["incomplete_with_clips"],
        "duplicate_keys": outcome["duplicate_keys"],
        "sources_reconcile": todo == accepted + rejected + deferred and outcome["unaccounted"] == 0,
        "clips_reconcile": outcome["incomplete_with_clips"] == 0 and outcome["duplicate_keys"] == 0,
    }


def format_summary(record: dict[str, Any]) -> str:
    c, totals = record["counts"], record["output_totals"]
    lines = [
        "",
        f"== run {record['run_id']} ({record['engine']}) finished in {record['wall_seconds']:.1f} s",
        f"inputs listed         {record['inputs_listed']:>8}   (already finished: {record['inputs_skipped']})",
        f"accepted sources      {c['accepted_sources']:>8}",
        f"rejected sources      {c['rejected_sources']:>8}",
        f"deferred sources      {c['deferred_sources']:>8}   (transient I/O errors: a rerun retries them)",
        f"clips                 {c['clips']:>8}   written {c['clips_written']}, rejected {c['clips_rejected']}",
        f"shards written        {record['shards_written']:>8}",
        f"counts reconcile      {'yes' if c['sources_reconcile'] and c['clips_reconcile'] else 'NO':>8}",
    ]
    if record["rejects"]:
        lines.append("rejects by reason:")
        for r in record["rejects"]:
            lines.append(f"  {r['level']:<6} {r['stage']:<16} {r['reason']:<20} {r['count']:>6}")
    lines.append(f"{'stage':<18}{'in':>8}{'out':>8}{'rejected':>10}{'seconds':>10}{'per item':>10}{'set-up s':>10}")
    for name, s in record["stages"].items():
        per = s["seconds"] / s["rows_in"] if s["rows_in"] else 0.0
        setup = s.get("setup_seconds", 0.0)
        lines.append(f"{name:<18}{int(s['rows_in']):>8}{int(s['rows_out']):>8}{int(s['rejected']):>10}{s['seconds']:>10.2f}{per:>10.3f}{setup:>10.2f}")
    if record.get("counters"):
        lines.append("counters:")
        for name, value in sorted(record["counters"].items()):
            lines.append(f"  {name:<40} {value:>8}")
    for name, why in (record.get("skipped_stages") or {}).items():
        lack = {"clip_embed": " (shards say has_clip false)", "vae_latents": " (shards say has_latent false)"}.get(name, "")
        lines.append(f"SKIPPED stage {name}{lack}: {why}")
    lines.append(
        f"output now holds {totals['samples']} samples in {totals['shards']} shards, {totals['rejects']} reject rows -> {record['output_dir']}"
    )
    return "\n".join(lines)
