"""A client for OpenAI-compatible chat servers (vLLM) that keeps many requests in flight.

`LLMClient.chat_many(requests)` sends a batch concurrently (bounded by `max_concurrency`), each
with a timeout and retries with exponential backoff (the openai SDK's own: connection errors,
timeouts, 408/409/429/5xx), and returns one `ChatResult` per request, in order. It never raises
for one request: a failed one comes back with `error` set, so a stage can flag that clip and go on.
The pipeline never imports vllm; this protocol is all it speaks."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    json_schema: dict | None = None  # vLLM structured output: the answer follows this schema
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. chat_template_kwargs, top_k


@dataclass
class ChatResult:
    text: str | None = None
    error: str | None = None  # None when the server answered
    error_kind: str = ""  # timeout | unavailable | http_<status> | empty | other
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def classify(exc: BaseException) -> str:
    import openai

    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "unavailable"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    return "other"


class LLMClient:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 32,
                 timeout_s: float = 120.0, retries: int = 3):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key = api_key or "EMPTY"
        self.max_concurrency, self.timeout_s, self.retries = max_concurrency, timeout_s, retries
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = None

    def _ensure(self):
        """One event loop and one connection pool per client, reused across batches."""
        if self._loop is None:
            import openai

            self._loop = asyncio.new_event_loop()
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                              timeout=self.timeout_s, max_retries=self.retries)
        return self._loop

    async def _one(self, sem: asyncio.Semaphore, req: ChatRequest) -> ChatResult:
        body = dict(req.extra_body)
        if req.json_schema is not None:
            # merged, so per-request options given in extra_body (e.g. a backend) are kept
            body["structured_outputs"] = {**body.get("structured_outputs", {}), "json": req.json_schema}
        async with sem:
            t0 = time.perf_counter()
            try:
                # The SDK's timeout is httpx's per phase (connect, each read), not per request; this
                # bounds the whole call: every attempt at most timeout_s, plus the SDK's backoff
                # (at most 8 s) between retries.
                resp = await asyncio.wait_for(self._client.chat.completions.create(
                    model=self.model, messages=req.messages, max_tokens=req.max_tokens,
                    temperature=req.temperature, top_p=req.top_p, extra_body=body or None,
                ), timeout=self.timeout_s * (self.retries + 1) + 8.0 * self.retries)
            except Exception as exc:  # noqa: BLE001 - returned, not raised: one request, one clip
                return ChatResult(error=f"{type(exc).__name__}: {str(exc)[:300]}", error_kind=classify(exc),
                                  latency_s=time.perf_counter() - t0)
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice else None
        usage = resp.usage
        result = ChatResult(text=text, latency_s=time.perf_counter() - t0,
                            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                            finish_reason=(choice.finish_reason if choice else "") or "")
        if not text:
            result.error, result.error_kind = "the server returned no text", "empty"
        return result

    async def _many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        sem = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._one(sem, r) for r in requests)))

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if not requests:
            return []
        return self._ensure().run_until_complete(self._many(requests))

    def models(self, timeout_s: float = 5.0) -> list[str]:
        """The served model names (a health check); raises when the server cannot be reached."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout_s) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]

    def close(self) -> None:
        loop, client, self._loop, self._client = self._loop, self._client, None, None
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.get_running_loop()
            return  # called (e.g. by __del__) inside another running loop: leave the sockets to the GC
        except RuntimeError:
            pass
        loop.run_until_complete(client.close())
        loop.close()
