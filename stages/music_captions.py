"""music_captions: MusicFlamingo (`nvidia/music-flamingo-2601-hf`) describes each clip's audio.

Every clip is asked every prompt of prompts/<captions.prompts>.yaml (a rich caption; tempo, key and
chords; genre and mood; instruments and vocals) and the answers land in

    meta.captions = {"answers": {prompt_id: text}, "errors": {prompt_id: reason},
                     "model": ..., "backend": "vllm" | "transformers", "prompts": "music_caption.v1"}

Answers are untrusted model output: control/format characters stripped, at most 2,000 characters.
A clip none of whose prompts got an answer goes on with `meta.flags.caption_failed = reason` (and
empty answers): prompt_fusion then works without captions. No clip is ever dropped here.

Backends (`captions.backend`, see stages/flamingo_backend.py):
- `vllm` (default): an OpenAI-compatible vLLM server serving MusicFlamingo at `captions.endpoint`
  (or one the pipeline starts, `captions.serve`); `captions.model` is the served model name.
- `transformers`: the model in process, from `captions.weights` (a local folder) or the Hugging Face
  cache; `captions.num_gpus` gives the workers a GPU.
Without an endpoint or weights, `prepare` raises WeightsMissing and `captions.on_missing: skip`
(the default) leaves the stage out of the run with that message."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from pipeline.stage import Reject, Resources, Row, Stage
from pipeline.weights import WeightsMissing, hub_offline

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
WEIGHTS_SETTING = "captions.weights"
NO_ENDPOINT = ("no MusicFlamingo endpoint configured: set captions.endpoint=http://HOST:PORT/v1 "
               "or captions.backend=transformers")
MIN_SECONDS = 0.1  # shorter audio is not worth a request


def load_prompts(name: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt or None, [(prompt_id, text)]) from prompts/<name>.yaml."""
    path = PROMPTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"caption prompts {name!r}: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    prompts = [(str(p["id"]), str(p["text"]).strip()) for p in data.get("prompts") or []]
    ids = [pid for pid, _ in prompts]
    if not prompts or len(set(ids)) != len(ids) or not all(text for _, text in prompts):
        raise ValueError(f"caption prompts {path}: need a non-empty list of prompts with unique ids and text")
    system = (data.get("system") or "").strip() or None
    return system, prompts


def resolve_weights(cfg) -> str:
    """A local MusicFlamingo folder: `captions.weights`, else the HF cache snapshot of `captions.model`."""
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsMissing(f"MusicFlamingo weights: {cfg.weights} is not a model folder (no config.json)")
        return str(path.resolve())
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(cfg.model, local_files_only=True)
        if (Path(path) / "config.json").is_file():
            return path
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "it is not downloaded automatically (~16 GB)"
    raise WeightsMissing(
        f"MusicFlamingo weights: {cfg.model} is not in the Hugging Face cache and {why}; fetch it with "
        f"`hf download {cfg.model}` (then copy ~/.cache/huggingface), or set {WEIGHTS_SETTING}=/path/to/folder, "
        f"or serve it with vLLM and set captions.backend=vllm captions.endpoint=http://HOST:PORT/v1")


def audio_problem(audio: Any) -> str | None:
    """Why this clip's audio cannot be captioned, or None."""
    if not isinstance(audio, np.ndarray):
        return f"no audio16 (got {type(audio).__name__})"
    if audio.ndim != 1:
        return f"audio16 must be mono [samples]; got shape {list(audio.shape)}"
    if len(audio) < MIN_SECONDS * 16000:
        return f"audio16 too short ({len(audio)} samples)"
    if not np.issubdtype(audio.dtype, np.floating):
        return f"audio16 must be float; got {audio.dtype}"
    return None


class MusicCaptions(Stage):
    name = "music_captions"
    consumes = ("audio16",)  # reads it; the runner keeps it until this stage is done

    def __init__(self, config: Any, context=None):
        super().__init__(config, context)
        cfg = config.captions
        gpus = cfg.num_gpus if cfg.backend == "transformers" else 0.0
        self.resources = Resources(num_cpus=cfg.num_cpus, num_gpus=gpus, pool_size=cfg.pool_size,
                                   batch_size=cfg.batch_size)
        self.backend = None

    @classmethod
    def prepare(cls, config: Any) -> dict[str, Any]:
        cfg = config.captions
        load_prompts(cfg.prompts)  # a typo in the prompt set fails the run before any worker starts
        if cfg.backend == "vllm":
            if not (cfg.endpoint or cfg.serve):
                raise WeightsMissing(NO_ENDPOINT)
            return {}
        return {WEIGHTS_SETTING: resolve_weights(cfg)}

    def setup(self) -> None:
        from stages.flamingo_backend import TransformersFlamingo, VllmFlamingo

        cfg = self.config.captions
        self.system, self.prompts = load_prompts(cfg.prompts)
        common = dict(system=self.system, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        if cfg.backend == "vllm":
            if not cfg.endpoint:
                raise WeightsMissing(NO_ENDPOINT)
            api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            self.backend = VllmFlamingo(cfg.endpoint, cfg.model, api_key=api_key, max_concurrency=cfg.max_concurrency,
                                        timeout_s=cfg.timeout_s, retries=cfg.retries, **common)
        else:
            weights = cfg.weights
            if not (weights and (Path(weights) / "config.json").is_file()):  # a direct caller, no preflight
                weights = resolve_weights(cfg)
            self.backend = TransformersFlamingo(weights, precision=cfg.precision, **common)

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        if self.backend is None:
            self.setup()
        cfg = self.config.captions
        problems = {id(r): audio_problem(r.get("audio16")) for r in rows}
        good = [r for r in rows if problems[id(r)] is None]
        answers: dict[int, dict] = {}
        try:
            for row, res in zip(good, self.backend.caption([r["audio16"] for r in good], self.prompts)):
                answers[id(row)] = res
        except Exception:  # noqa: BLE001 - the backend broke on the batch: clip by clip, so only a bad one fails
            for row in good:
                try:
                    answers[id(row)] = self.backend.caption([row["audio16"]], self.prompts)[0]
                except Exception as exc:  # noqa: BLE001
                    problems[id(row)] = f"captioning failed: {type(exc).__name__}: {str(exc)[:300]}"
        for row in rows:
            meta = row.setdefault("meta", {})
            res = answers.get(id(row), {})
            ok = {pid: a.text for pid, a in res.items() if a.ok}
            errors = {pid: a.error or "empty" for pid, a in res.items() if not a.ok}
            if problems[id(row)] is not None:
                errors = {pid: problems[id(row)] for pid, _ in self.prompts}
            meta["captions"] = {"answers": ok, "model": cfg.model, "backend": cfg.backend, "prompts": cfg.prompts,
                                "errors": errors}
            if not ok:
                reason = problems[id(row)] or next(iter(errors.values()), "no answers")
                meta.setdefault("flags", {})["caption_failed"] = reason[:300]
            yield row

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            try:
                backend.close()
            except Exception:  # noqa: BLE001
                pass
