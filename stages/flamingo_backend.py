"""MusicFlamingo behind one interface, two ways:

    backend.caption(audio16_list, prompts) -> [{prompt_id: Answer(text=... | error=...)}, ...]

one dict per clip (in order), one `Answer` per prompt id. `audio16_list` holds float32 [n] 16 kHz
mono clips; `prompts` is [(id, text)]; the system prompt is given to the backend's constructor.
Neither backend raises for one clip or one prompt: a failed request comes back as an `Answer` with
`error` set, so the stage can flag that clip and go on.

- `VllmFlamingo`: chat requests to an OpenAI-compatible vLLM server (`pipeline.llm.client.LLMClient`),
  every prompt x clip of a call in flight at once (bounded by `max_concurrency`). The audio goes as an
  OpenAI `input_audio` content part: a 16-bit PCM WAV, base64 (vLLM's chat API also accepts
  `audio_url` with a data: URL; both reach the same audio loader). One WAV per clip, shared by its prompts.
- `TransformersFlamingo`: `MusicFlamingoForConditionalGeneration` + `AutoProcessor` in process, from a
  local folder; clip x prompt conversations batched through `processor.apply_chat_template` and
  `generate` (left padding), at most `max_batch` sequences per call. The reference implementation.

Answers are model output, hence untrusted: `clean_text` strips control/format characters and caps
the length before anything else sees them."""
from __future__ import annotations

import base64
import io
import unicodedata
import wave
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16000
MAX_ANSWER_CHARS = 2000


@dataclass
class Answer:
    text: str | None = None
    error: str | None = None  # why there is no text ("unavailable: APIConnectionError: ...")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text)


def clean_text(text: Any, limit: int = MAX_ANSWER_CHARS) -> str:
    """Model output made safe to store: no control or invisible format characters (newlines and tabs
    kept, line/paragraph separators become newlines), stripped, at most `limit` characters."""
    text = text if isinstance(text, str) else str(text)
    text = text[: 8 * limit + 64]
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat in ("Zl", "Zp"):
            out.append("\n")
        elif cat not in ("Cc", "Cf", "Cs", "Co", "Cn") and ch != "\ufffd":
            out.append(ch)
    text = "".join(out).strip()
    return text[: max(0, limit - 1)] + "…" if len(text) > limit else text


def _answer(text: str | None, error: str | None, limit: int) -> Answer:
    if error:
        return Answer(error=error[:500])
    text = clean_text(text or "", limit)
    return Answer(text=text) if text else Answer(error="empty: the model returned no text")


def wav_base64(audio16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
    """float32 mono -> base64 of a 16-bit PCM WAV file."""
    pcm = (np.clip(np.nan_to_num(np.asarray(audio16, dtype=np.float32)), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def audio_part(audio16: np.ndarray) -> dict[str, Any]:
    """The OpenAI chat content part vLLM accepts for audio."""
    return {"type": "input_audio", "input_audio": {"data": wav_base64(audio16), "format": "wav"}}


class FlamingoBackend:
    name = "base"

    def caption(self, audio16_list: Sequence[np.ndarray], prompts: Sequence[tuple[str, str]]) -> list[dict[str, Answer]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VllmFlamingo(FlamingoBackend):
    name = "vllm"

    def __init__(self, endpoint: str, model: str, *, system: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.2, top_p: float = 0.9, api_key: str | None = None,
                 max_concurrency: int = 32, timeout_s: float = 120.0, retries: int = 3,
                 limit: int = MAX_ANSWER_CHARS):
        from pipeline.llm.client import LLMClient

        self.client = LLMClient(endpoint, model, api_key=api_key, max_concurrency=max_concurrency,
                                timeout_s=timeout_s, retries=retries)
        self.system, self.limit = system, limit
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p

    def messages(self, part: dict[str, Any], prompt: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}]

    def caption(self, audio16_list, prompts):
        from pipeline.llm.client import ChatRequest

        parts = [audio_part(a) for a in audio16_list]
        pairs = [(i, pid, text) for i in range(len(parts)) for pid, text in prompts]
        requests = [ChatRequest(messages=self.messages(parts[i], text), max_tokens=self.max_tokens,
                                temperature=self.temperature, top_p=self.top_p) for i, _, text in pairs]
        results = self.client.chat_many(requests)
        out: list[dict[str, Answer]] = [{} for _ in parts]
        for (i, pid, _), res in zip(pairs, results):
            error = None if res.ok else f"{res.error_kind or 'other'}: {res.error}"
            out[i][pid] = _answer(res.text, error, self.limit)
        return out

    def close(self) -> None:
        self.client.close()


class TransformersFlamingo(FlamingoBackend):
    name = "transformers"

    def __init__(self, weights: str, *, system: str | None = None, precision: str = "auto", max_tokens: int = 512,
                 temperature: float = 0.2, top_p: float = 0.9, max_batch: int = 16, limit: int = MAX_ANSWER_CHARS):
        import torch
        from transformers import AutoProcessor, MusicFlamingoForConditionalGeneration

        from pipeline.devices import torch_device, torch_dtype

        self.device = torch_device()
        self.dtype = torch_dtype(precision, self.device)
        self.processor = AutoProcessor.from_pretrained(weights)
        self.model = MusicFlamingoForConditionalGeneration.from_pretrained(weights, dtype=self.dtype)
        self.model = self.model.to(self.device).eval()
        self.torch = torch
        self.system, self.limit, self.max_batch = system, limit, max(1, max_batch)
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p

    def conversation(self, audio16: np.ndarray, prompt: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": [{"type": "audio", "audio": np.asarray(audio16, np.float32)},
                                                    {"type": "text", "text": prompt}]}]

    def inputs(self, conversations: list[list[dict[str, Any]]]):
        """The processor's batch for these conversations, on the model's device, features in its dtype."""
        batch = self.processor.apply_chat_template(conversations, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)
        batch = batch.to(self.device)
        batch["input_features"] = batch["input_features"].to(self.dtype)
        return batch

    def generate(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        batch = self.inputs(conversations)
        sample = self.temperature > 0
        kwargs = {"do_sample": sample, "temperature": self.temperature, "top_p": self.top_p} if sample else {"do_sample": False}
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_tokens, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def caption(self, audio16_list, prompts):
        pairs = [(i, pid, text) for i in range(len(audio16_list)) for pid, text in prompts]
        out: list[dict[str, Answer]] = [{} for _ in audio16_list]
        for start in range(0, len(pairs), self.max_batch):
            chunk = pairs[start:start + self.max_batch]
            convs = [self.conversation(audio16_list[i], text) for i, _, text in chunk]
            try:
                texts: list[str | Exception] = list(self.generate(convs))
            except Exception:  # noqa: BLE001 - one bad clip broke the batch: one by one, so only it fails
                texts = []
                for conv in convs:
                    try:
                        texts.append(self.generate([conv])[0])
                    except Exception as exc:  # noqa: BLE001
                        texts.append(exc)
            for (i, pid, _), text in zip(chunk, texts):
                if isinstance(text, Exception):
                    out[i][pid] = Answer(error=f"other: {type(text).__name__}: {str(text)[:300]}")
                else:
                    out[i][pid] = _answer(text, None, self.limit)
        return out
