"""Transient or permanent: which I/O failures deserve another try.

Object stores fail in passing all the time at scale (throttling, expired session tokens, dropped
connections, a 503 from a busy partition). Such a failure says nothing about the video, so it must
never become a permanent reject that resume treats as finished. `is_retryable` tells the two kinds
apart by walking the exception chain, `retry_io` retries the transient kind with backoff, and
`configure_fsspec` lets s3fs retry inside botocore before we ever see the error.

botocore, aiohttp and PyAV are optional here: an exception of theirs can only exist once their
module is imported, so they are looked up in `sys.modules` and never imported by this file.
"""
from __future__ import annotations

import errno
import http.client
import logging
import random
import re
import ssl
import sys
import time
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Error codes (AWS, GCS, generic HTTP) that name a throttled, overloaded or briefly broken service,
# or credentials that expired mid-run and are refreshed on the next attempt.
RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "PriorRequestNotComplete",
    "ServiceUnavailable", "ServiceUnavailableException", "InternalError", "InternalServerError",
    "InternalFailure", "BadGateway", "GatewayTimeout", "RequestTimeout", "RequestTimeoutException",
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
    "408", "429", "500", "502", "503", "504",
})
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NETWORK_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH",
        "EHOSTDOWN", "ENETUNREACH", "ENETDOWN", "ENETRESET", "EAGAIN",
        # s3fs's translations of SlowDown / 503 / ServiceUnavailable / OperationAborted (EBUSY) and
        # of InternalError / 500 (EREMOTEIO)
        "EBUSY", "EREMOTEIO",
    ) if hasattr(errno, name)
)
_NAMES = re.compile(r"\b(" + "|".join(sorted((c for c in RETRYABLE_CODES if not c.isdigit()), key=len, reverse=True)) + r")\b")
_PHRASES = re.compile(
    r"reduce your request rate|service unavailable|internal (?:server )?error|too many requests|rate exceeded"
    r"|bad gateway|gateway time-?out"
    r"|token (?:has )?expired|token .{0,40}is expired|request timed? ?out"
    # botocore's "An error occurred (503) when calling ...", or "status 503" / "HTTP 503"
    r"|\((?:408|429|50[0-4])\)|\b(?:status|http)(?: code)?[\s:=]*(?:408|429|50[0-4])\b",
    re.IGNORECASE,
)
MAX_BACKOFF_SECONDS = 30.0
_BOTOCORE_TRANSIENT = (
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError",
    # The worker's credential provider (instance metadata, STS) was briefly unreachable: the video
    # is not at fault, and a permanent reject would outlive the outage.
    "NoCredentialsError", "CredentialRetrievalError",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend((e.__cause__, e.__context__))


def _message(exc: BaseException) -> str:
    """The error text without a file name (an object called 'SlowDown.mp4' proves nothing)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror is not None:
        return str(exc.strerror)
    return " ".join(str(a) for a in exc.args if isinstance(a, (str, int)))


def _names_transient(text: str) -> bool:
    return bool(_NAMES.search(text) or _PHRASES.search(text))


def _client_error_code(exc: BaseException) -> tuple[str, int | None] | None:
    """(code, HTTP status) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or not isinstance(response.get("Error"), dict):
        return None
    code = str(response["Error"].get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def _link_is_retryable(exc: BaseException) -> bool:
    """Whether this one exception, on its own, names a transient condition."""
    av_error = sys.modules.get("av.error")
    if av_error is not None and isinstance(exc, av_error.FFmpegError):
        # FFmpeg's own errors are about the media (EAGAIN there is decoder state, not the network);
        # only its network errors, when FFmpeg itself did the I/O, are transient.
        return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
            "HTTPServerError", "HTTPTooManyRequestsError")
    if isinstance(exc, (ConnectionError, TimeoutError, http.client.IncompleteRead, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True  # refused / reset / aborted / broken pipe; socket.timeout, asyncio and fsspec timeouts
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        transient = tuple(getattr(botocore, name) for name in _BOTOCORE_TRANSIENT if hasattr(botocore, name))
        if isinstance(exc, transient):
            return True
        if isinstance(exc, botocore.ClientError):
            code, status = _client_error_code(exc) or ("", None)
            return code in RETRYABLE_CODES or status in RETRYABLE_STATUS
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return False  # a certificate does not fix itself
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True  # disconnects, refused connections, server timeouts, truncated bodies
    fsspec_exc = sys.modules.get("fsspec.exceptions")
    if fsspec_exc is not None and isinstance(exc, fsspec_exc.FSTimeoutError):
        return True
    for attr in ("status", "status_code"):  # aiohttp ClientResponseError, requests-style errors
        if isinstance(getattr(exc, attr, None), int) and getattr(exc, attr) in RETRYABLE_STATUS:
            return True
    if type(exc).__name__ == "HttpError" and getattr(exc, "code", None) in RETRYABLE_STATUS:
        return True  # gcsfs
    if type(exc).__name__ in RETRYABLE_CODES:
        return True  # google.api_core.exceptions.ServiceUnavailable, TooManyRequests, ...
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError):
        if exc.errno in NETWORK_ERRNOS:
            return True
        # s3fs turns ClientErrors into OSError(EBUSY / EIO / EREMOTEIO, message) or PermissionError
        # (ExpiredToken); the ClientError is usually the __cause__, the text says it otherwise.
        return _names_transient(_message(exc))
    if _client_error_code(exc) is not None:  # a ClientError look-alike from another SDK
        code, status = _client_error_code(exc)
        return code in RETRYABLE_CODES or status in RETRYABLE_STATUS
    return False


def is_retryable(exc: BaseException) -> bool:
    """True when `exc` or anything in its chain (`__cause__`, `__context__`) is a transient I/O
    failure: a network error, a timeout, throttling, a 5xx, expired credentials.

    Missing files, access denied, bad media and value errors are permanent, unless their chain
    shows a transient root: fsspec's HTTP filesystem reports a refused connection as
    FileNotFoundError(url) from the connection error; s3fs reports ExpiredToken as a
    PermissionError from the ClientError."""
    return any(_link_is_retryable(e) for e in _chain(exc))


def backoff_delay(attempt: int, backoff_seconds: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (0-based): doubling, capped, with up
    to 10 % jitter so that many workers throttled together do not come back together."""
    base = min(MAX_BACKOFF_SECONDS, backoff_seconds * (2 ** attempt))
    return base + random.uniform(0.0, 0.1 * base)


def retry_io(fn: Callable[[], T], *, attempts: int, backoff_seconds: float, what: str = "") -> T:
    """`fn()`, tried up to `attempts` times while it fails with a retryable error (see
    `is_retryable`), sleeping `backoff_seconds * 2**i` (capped at 30 s, plus jitter) in between.
    A permanent error propagates at once; the last transient one propagates when attempts run out."""
    attempts = max(1, int(attempts))
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt + 1 >= attempts or not is_retryable(exc):
                raise
            delay = backoff_delay(attempt, backoff_seconds)
            log.warning("transient I/O error%s (attempt %d of %d), retrying in %.1f s: %s: %s",
                        f" in {what}" if what else "", attempt + 1, attempts, delay, type(exc).__name__, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# botocore's "standard" retry mode retries throttling codes, 5xx, and connection errors with
# exponential backoff and a client-wide retry quota; s3fs's default is botocore's "legacy" mode.
S3_CONFIG_KWARGS = {
    "retries": {"max_attempts": 10, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 30,
}


def configure_fsspec() -> None:
    """Default botocore retries and timeouts for every s3fs filesystem created from now on (through
    `fsspec.config.conf["s3"]["config_kwargs"]`, which fsspec applies as default constructor kwargs).
    Keys the user set there (in ~/.config/fsspec, FSSPEC_S3* variables or code) are kept; an
    explicit `config_kwargs=` passed to the filesystem still wins. Idempotent and cheap."""
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    current = s3.get("config_kwargs")
    if isinstance(current, dict) and all(k in current for k in S3_CONFIG_KWARGS):
        return
    merged = dict(current or {})
    for key, value in S3_CONFIG_KWARGS.items():
        merged.setdefault(key, value if not isinstance(value, dict) else dict(value))
    s3["config_kwargs"] = merged
