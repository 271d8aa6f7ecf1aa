"""prompt_fusion: Qwen3-8B (thinking off, JSON-schema structured output, through an OpenAI-compatible
vLLM server) turns the measurements, the visual tags, the MusicFlamingo captions and the source
metadata of each clip into normalised attributes and text prompts at fixed control levels.

Per batch: one request per clip (prompts/<llm.template>.txt, every untrusted text in a DATA block,
stages/untrusted.py), all sent at once through `LLMClient.chat_many`; each answer is parsed and
validated against prompts/fusion_schema.py (length caps included); answers that are malformed, empty
or refused by the server are asked again, up to `llm.attempts` requests per clip (a server that
cannot be reached or times out was already retried by the client, and a request the server refuses
with a 4xx would be refused again, so those are not asked again). Valid
answers are reconciled with the measurements (stages/fusion_reconcile.py: the measurement wins,
disagreements are recorded). A clip without a valid answer gets the template composer's prompts
(stages/template_prompts.py) and `flags.llm_fallback = <reason>`: no clip is lost to the LLM.

Answers are cached by a content hash of (model, template, schema version, request messages) in
append-only JSONL files under OUT/cache/prompt_fusion/ (one per worker process), so a resumed run
does not ask again (`provenance.cached`). Object stores cannot append: for an s3:// or gs:// OUT the
cache lives on each node's disk (`cache_folder`).

Writes, per clip:
  meta.fused         {attributes, sources, disagreements, caption_claims, provenance} (LLM answers only)
  meta.prompts       {full_spec, musical, scene, intent} (LLM) or the template's levels (fallback)
  meta.prompt_source {composer: "llm", model, template} | {composer: "template", template,
                      fallback_reason, detail, model, attempts}
  meta.flags.llm_fallback  the fallback reason (fallback only)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any, Iterable

from pipeline.stage import Reject, Resources, Row, Stage
from pipeline.worker_env import cache_root
from prompts.fusion_schema import FUSION_SCHEMA_VERSION, FusionAnswer, json_schema
from stages.fusion_reconcile import measured_progression, reconcile
from stages.template_prompts import PROMPTS_DIR, describe, load_template
from stages.untrusted import block

log = logging.getLogger(__name__)

CAPTION_CHARS = 1500  # per caption answer
SOURCE_CHARS = 200  # file name, each container tag
TAG_CHARS = 64
DETAIL_CHARS = 300
# Client error kinds the client already retried with backoff (asking again only doubles the wait),
# and requests the server refused as such (a 4xx other than 408/409/429: the same request gets the
# same answer; e.g. a prompt longer than the served context, a schema the backend cannot compile).
NOT_REASKED = ("unavailable", "timeout")


def reasked(kind: str) -> bool:
    if kind in NOT_REASKED:
        return False
    if kind.startswith("http_4") and kind not in ("http_408", "http_409", "http_429"):
        return False
    return True


def fallback_reason(kind: str) -> str:
    if kind in NOT_REASKED:
        return kind
    if kind.startswith("http_5") or kind in ("http_408", "http_409", "http_429"):
        return "server_error"
    if kind.startswith("http_4"):
        return "request_rejected"
    return "client_error"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


@lru_cache(maxsize=8)
def load_fusion_template(name: str) -> tuple[str, str]:
    """(system, user) messages of prompts/<name>.txt; the user one is a string.Template."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"prompt_fusion template {name!r} not found at {path}")
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := re.match(r"^=== (\w+) ===\s*$", line):
            current = sections.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    missing = {"system", "user"} - set(sections)
    if missing:
        raise ValueError(f"{path}: missing section(s) {sorted(missing)} ('=== system ===', '=== user ===')")
    return "\n".join(sections["system"]).strip(), "\n".join(sections["user"]).strip()


def clip_data(meta: dict) -> dict[str, Any]:
    """The four DATA blocks' values for one clip."""
    music, visual, clip = meta.get("music") or {}, meta.get("visual") or {}, meta.get("clip") or {}
    measured = {
        "clip_seconds": clip.get("duration"),
        "tempo_bpm": music.get("tempo_bpm"),
        "beat_count": music.get("beat_count"),
        "key": music.get("key"),
        "key_confidence": music.get("key_confidence"),
        "chords": measured_progression(music.get("chords") or []),
        "loudness_dbfs": music.get("loudness_dbfs"),
        "peak_dbfs": music.get("peak_dbfs"),
        "cuts_per_minute": visual.get("cuts_per_minute"),
        "motion_mean": visual.get("motion_mean"),
        "cut_beat_alignment": visual.get("cut_beat_alignment"),
    }
    tags = {
        category: [t.get("tag", "") if isinstance(t, dict) else t for t in (items or [])]
        for category, items in (meta.get("visual_tags") or {}).items()
    }
    captions = (meta.get("captions") or {}).get("answers") or {}
    source = meta.get("source") or {}
    path = str(source.get("path", ""))
    return {
        "measured": measured,
        "visual_tags": tags,
        "captions": {str(k): v for k, v in captions.items() if v},
        "source": {
            "file_name": path.rsplit("/", 1)[-1],
            "tags": (meta.get("probe") or {}).get("tags") or {},
        },
    }


def build_messages(meta: dict, system: str, user: str) -> list[dict[str, str]]:
    data = clip_data(meta)
    text = Template(user).substitute(
        measured=block("measured", data["measured"], TAG_CHARS),
        visual_tags=block("visual_tags", data["visual_tags"], TAG_CHARS),
        captions=block("captions", data["captions"], CAPTION_CHARS),
        source=block("source", data["source"], SOURCE_CHARS),
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def cache_key(model: str, template: str, messages: list[dict]) -> str:
    blob = json.dumps({"model": model, "template": template, "schema_version": FUSION_SCHEMA_VERSION,
                       "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_answer(text: str | None) -> tuple[FusionAnswer | None, str]:
    """(answer, "") or (None, why it is not valid)."""
    if not text:
        return None, "empty answer"
    text = _THINK.sub("", text).strip()
    try:
        # strict=False: xgrammar's JSON grammar lets raw control characters into strings (JSON does
        # not); they parse here and the schema's cleaners drop them.
        data = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at char {exc.pos} of {len(text)})"
    try:
        return FusionAnswer.model_validate(data), ""
    except Exception as exc:  # pydantic.ValidationError
        errors = getattr(exc, "errors", lambda: [])()
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errors[:3]]
        return None, "schema: " + ("; ".join(parts) or str(exc))[:DETAIL_CHARS]


class AnswerCache:
    """Valid answers by content hash, in append-only JSONL files (one per worker process, so
    workers never share a file). Loading keeps only (file, offset) per hash; a torn last line from
    a killed run is skipped."""

    def __init__(self, folder: Path, run_id: str):
        self.folder = folder
        self.index: dict[str, tuple[Path, int]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.jsonl")):
            with open(path, "rb") as fh:
                offset = 0
                for line in fh:
                    try:
                        key = json.loads(line)["key"]
                    except (ValueError, KeyError, TypeError):
                        key = None
                    if key and line.endswith(b"\n"):
                        self.index[key] = (path, offset)
                    offset += len(line)
        safe_run = re.sub(r"[^A-Za-z0-9_-]", "_", run_id or "run")[:40]
        self.path = folder / f"{safe_run}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fh = None

    def get(self, key: str) -> FusionAnswer | None:
        where = self.index.get(key)
        if where is None:
            return None
        path, offset = where
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                record = json.loads(fh.readline())
            return FusionAnswer.model_validate(record["answer"])  # the file is checked like an answer
        except Exception:  # noqa: BLE001 - a bad cache line is a miss, not a failure
            return None

    def put(self, items: list[tuple[str, FusionAnswer, str]]) -> None:
        if not items:
            return
        if self._fh is None:
            self._fh = open(self.path, "ab")
        for key, answer, model in items:
            offset = self._fh.tell()
            line = json.dumps({"key": key, "model": model, "schema_version": FUSION_SCHEMA_VERSION,
                               "time": round(time.time(), 3), "answer": answer.model_dump()}, ensure_ascii=False)
            self._fh.write(line.encode() + b"\n")
            self.index[key] = (self.path, offset)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def cache_folder(output_dir: str) -> Path:
    """OUT/cache/prompt_fusion on a filesystem; for an object store (no appends there) a folder on
    this node's disk, one per output, so a resumed run on the same node still skips answered clips."""
    if "://" not in output_dir or output_dir.startswith("file://"):
        return Path(output_dir.removeprefix("file://")) / "cache" / "prompt_fusion"
    return cache_root() / "prompt_fusion" / hashlib.sha256(output_dir.encode()).hexdigest()[:16]


class PromptFusion(Stage):
    name = "prompt_fusion"

    def __init__(self, config: Any, context=None):
        super().__init__(config, context)
        cfg = config.llm
        self.resources = Resources(num_cpus=cfg.num_cpus, pool_size=cfg.pool_size, batch_size=cfg.batch_size)
        self.client = None
        self.cache: AnswerCache | None = None
        self._ready = False

    def setup(self) -> None:
        from pipeline.llm.client import LLMClient

        cfg = self.config.llm
        self.system, self.user = load_fusion_template(cfg.template)
        self.schema = json_schema()
        if cfg.endpoint:
            api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            self.client = LLMClient(cfg.endpoint, cfg.model, api_key=api_key, max_concurrency=cfg.max_concurrency,
                                    timeout_s=cfg.timeout_s, retries=cfg.retries)
        if cfg.cache and self.context is not None and self.context.output_dir:
            self.cache = AnswerCache(cache_folder(self.context.output_dir), self.context.run_id)
        self._ready = True

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cache is not None:
            self.cache.close()

    def _request(self, messages: list[dict]):
        from pipeline.llm.client import ChatRequest

        cfg = self.config.llm
        return ChatRequest(
            messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            json_schema=self.schema,
            extra_body={"top_k": cfg.top_k, "chat_template_kwargs": {"enable_thinking": False}},
        )

    def ask(self, messages: list[list[dict]]) -> list[dict]:
        """One outcome per clip: {answer, attempts, reason, detail, completion_tokens}."""
        cfg = self.config.llm
        out = [{"answer": None, "attempts": 0, "reason": "", "detail": "", "completion_tokens": 0} for _ in messages]
        pending = list(range(len(messages)))
        for _ in range(max(1, cfg.attempts)):
            if not pending:
                break
            results = self.client.chat_many([self._request(messages[i]) for i in pending])
            again = []
            for i, result in zip(pending, results):
                o = out[i]
                o["attempts"] += 1
                o["completion_tokens"] += result.completion_tokens
                if not result.ok and result.error_kind != "empty":
                    kind = result.error_kind or "other"
                    o["reason"] = fallback_reason(kind)
                    o["detail"] = f"{kind}: {result.error}"[:DETAIL_CHARS]
                    if reasked(kind):
                        again.append(i)
                    continue
                answer, why = parse_answer(result.text)
                if answer is None:
                    o["reason"] = "invalid_answer"
                    truncated = " (cut at max_tokens)" if result.finish_reason == "length" else ""
                    o["detail"] = f"{why}{truncated}"[:DETAIL_CHARS]
                    again.append(i)
                else:
                    o.update(answer=answer, reason="", detail="")
            pending = again
        return out

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        if not self._ready:
            self.setup()
        cfg = self.config.llm
        outcomes: list[dict] = [{} for _ in rows]
        messages: list[list[dict] | None] = [None] * len(rows)
        keys: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                messages[i] = build_messages(row["meta"], self.system, self.user)
                keys[i] = cache_key(cfg.model, cfg.template, messages[i])
            except Exception as exc:  # noqa: BLE001 - one clip's odd metadata: that clip falls back
                outcomes[i] = {"reason": "prompt_build_failed", "detail": f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS]}
                continue
            if self.client is None:
                outcomes[i] = {"reason": "no_endpoint", "detail": "llm.endpoint is not set"}
            elif self.cache is not None and (hit := self.cache.get(keys[i])) is not None:
                outcomes[i] = {"answer": hit, "attempts": 0, "cached": True}
        ask = [i for i in range(len(rows)) if not outcomes[i]]
        if ask:
            try:
                asked = self.ask([messages[i] for i in ask])
            except Exception as exc:  # noqa: BLE001 - the client never raises per request; this is a bug guard
                log.exception("prompt_fusion: the batch failed")
                asked = [{"reason": "client_error", "detail": f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS],
                          "attempts": 1} for _ in ask]
            for i, outcome in zip(ask, asked):
                outcomes[i] = outcome
            if self.cache is not None:
                self.cache.put([(keys[i], outcomes[i]["answer"], cfg.model) for i in ask if outcomes[i].get("answer")])
        for row, outcome in zip(rows, outcomes):
            try:
                item = self._finish(row, outcome)
            except Exception as exc:  # noqa: BLE001 - a stage never raises for one item
                item = Reject.for_row(self.name, row, "prompt_failed", f"{type(exc).__name__}: {exc}")
            yield item

    def _finish(self, row: Row, outcome: dict) -> Row | Reject:
        cfg = self.config.llm
        meta = row["meta"]
        answer: FusionAnswer | None = outcome.get("answer")
        if answer is None:
            return self._fallback(row, outcome)
        dump = answer.model_dump()
        attributes, disagreements, sources = reconcile(dump, meta.get("music") or {}, cfg.tempo_tolerance_pct)
        captions = meta.get("captions") or {}
        meta["fused"] = {
            "attributes": attributes,
            "sources": sources,
            "disagreements": disagreements,
            "caption_claims": dump["caption_claims"],
            "provenance": {
                "model": cfg.model,
                "schema_version": FUSION_SCHEMA_VERSION,
                "template": cfg.template,
                "cached": bool(outcome.get("cached")),
                "attempts": int(outcome.get("attempts", 0)),
                "captions_model": captions.get("model") if captions.get("answers") else None,
                "completion_tokens": int(outcome.get("completion_tokens", 0)),
            },
        }
        meta["prompts"] = dict(dump["prompts"])
        meta["prompt_source"] = {"composer": "llm", "model": cfg.model, "template": cfg.template}
        self.count("composer.llm")
        self.count("answers_from_cache", int(bool(outcome.get("cached"))))
        self.count("disagreements", len(disagreements))
        if cfg.drop_vocals and attributes.get("vocals_present"):
            return Reject.for_row(self.name, row, "vocals_present",
                                  f"{cfg.model} ({cfg.template}) says the clip has vocals and llm.drop_vocals is on")
        return row

    def _fallback(self, row: Row, outcome: dict) -> Row:
        cfg = self.config.llm
        meta = row["meta"]
        template = self.config.prompts.template
        fields = describe(meta)
        reason = outcome.get("reason") or "invalid_answer"
        meta["prompts"] = {level: text.format(**fields) for level, text in load_template(template).items()}
        source = {"composer": "template", "template": template, "fallback_reason": reason,
                  "detail": str(outcome.get("detail", ""))[:DETAIL_CHARS]}
        if self.client is not None:
            source.update(model=cfg.model, llm_template=cfg.template, attempts=int(outcome.get("attempts", 0)))
        meta["prompt_source"] = source
        meta.setdefault("flags", {})["llm_fallback"] = reason
        self.count("composer.template")
        self.count(f"fallback.{reason}")
        return row
