"""Transient or permanent: real exceptions from sockets, botocore, s3fs, fsspec and PyAV are told
apart, `retry_io` retries only the transient ones, and probe defers what it could not reach."""
from __future__ import annotations

import errno
import http.server
import io
import socket
import threading
import time

import pytest

from pipeline.errors import backoff_delay, configure_fsspec, is_retryable, retry_io
from pipeline.stage import Reject
from stages.probe import Probe

from helpers import small_config


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caught(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the point is to look at it
        return exc
    raise AssertionError(f"{fn} raised nothing")


# --- plain Python and socket errors ---------------------------------------------------------

def test_refused_connection_is_retryable():
    port = closed_port()
    exc = caught(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    assert isinstance(exc, ConnectionRefusedError)
    assert is_retryable(exc)


def test_socket_timeout_is_retryable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=0.05)
        try:
            exc = caught(lambda: client.recv(10))  # the server never sends anything
        finally:
            client.close()
    assert isinstance(exc, socket.timeout)
    assert is_retryable(exc)


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ECONNRESET, "Connection reset by peer"), True),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
    (OSError(errno.EAGAIN, "Resource temporarily unavailable"), True),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), True),
    (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs: SlowDown, 503
    (OSError(errno.EREMOTEIO, "Internal Server Error"), True),  # s3fs: InternalError, 500
    (OSError("An error occurred (503) when calling the HeadObject operation: Service Unavailable"), True),
    (ConnectionAbortedError(), True),
    (TimeoutError(), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "video.mp4"), False),
    (PermissionError(errno.EACCES, "Permission denied", "video.mp4"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "videos"), False),
    (OSError(errno.EIO, "Input/output error", "SlowDown.mp4"), False),  # a file name proves nothing
    (ValueError("negative duration"), False),
    (KeyError("video"), False),
])
def test_builtin_errors(exc, expected):
    assert is_retryable(exc) is expected


def chained(outer: BaseException, inner: BaseException, *, cause: bool) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            if cause:
                raise outer from e
            raise outer
    except BaseException as got:  # noqa: BLE001
        return got


def test_chains_are_walked_through_cause_and_context():
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert is_retryable(chained(FileNotFoundError("http://host/v.mp4"), reset, cause=True))
    assert is_retryable(chained(RuntimeError("while reading"), reset, cause=False))
    assert is_retryable(chained(ValueError("wrapper"), chained(OSError("middle"), TimeoutError(), cause=True), cause=True))
    assert not is_retryable(chained(RuntimeError("wrapper"), FileNotFoundError("gone"), cause=True))
    assert not is_retryable(chained(FileNotFoundError("gone"), PermissionError("denied"), cause=False))


def test_decoding_errors_are_permanent():
    import av

    exc = caught(lambda: av.open(io.BytesIO(b"this is not a video" * 100)))
    assert isinstance(exc, av.error.FFmpegError)
    assert not is_retryable(exc)
    # FFmpeg's EAGAIN is decoder state, not the network.
    assert not is_retryable(av.error.BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"))


def test_pyav_passes_a_reader_s_connection_error_through(tmp_path):
    """What the segment stage relies on: a file object's exception comes out of PyAV as itself."""
    import av

    from pipeline.synth.media import make_video

    class Resets(io.RawIOBase):
        def __init__(self, data):
            self.f = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def tell(self):
            return self.f.tell()

        def read(self, n=-1):
            if self.f.tell() > 1000:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return self.f.read(n)

    make_video(tmp_path / "v.mp4", seconds=2.0, seed=1)
    data = (tmp_path / "v.mp4").read_bytes()

    def decode():
        with av.open(Resets(data), metadata_errors="ignore") as c:
            for _ in c.decode(c.streams.video[0]):
                pass

    exc = caught(decode)
    assert isinstance(exc, ConnectionResetError) and is_retryable(exc)


# --- botocore, aiohttp, fsspec ---------------------------------------------------------------

def client_error(code: str, status: int, message: str = "", op: str = "GetObject"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message or f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


RETRYABLE_CODES = [("SlowDown", 503), ("Throttling", 400), ("ThrottlingException", 400), ("RequestLimitExceeded", 503),
                   ("TooManyRequests", 429), ("429", 429), ("500", 500), ("502", 502), ("503", 503), ("504", 504),
                   ("ServiceUnavailable", 503), ("InternalError", 500), ("RequestTimeout", 400),
                   ("ExpiredToken", 400), ("ExpiredTokenException", 400), ("TokenRefreshRequired", 400)]
PERMANENT_CODES = [("NoSuchKey", 404), ("404", 404), ("AccessDenied", 403), ("403", 403), ("NoSuchBucket", 404),
                   ("InvalidRange", 416), ("InvalidAccessKeyId", 403), ("400", 400)]


@pytest.mark.parametrize("code, status", RETRYABLE_CODES)
def test_retryable_client_error_codes(code, status):
    assert is_retryable(client_error(code, status))


@pytest.mark.parametrize("code, status", PERMANENT_CODES)
def test_permanent_client_error_codes(code, status):
    assert not is_retryable(client_error(code, status))


@pytest.mark.parametrize("code, status, expected", [*[(c, s, True) for c, s in RETRYABLE_CODES],
                                                    *[(c, s, False) for c, s in PERMANENT_CODES]])
def test_s3fs_translated_errors(code, status, expected):
    """s3fs turns ClientErrors into OSError / PermissionError / FileNotFoundError; with the cause
    kept (as s3fs raises them) and without it (only the text is left)."""
    from s3fs.errors import translate_boto_error

    error = client_error(code, status, message={
        "SlowDown": "Please reduce your request rate.", "ExpiredToken": "The provided token has expired.",
        "InternalError": "We encountered an internal error. Please try again.",
        "ServiceUnavailable": "Service Unavailable", "NoSuchKey": "The specified key does not exist.",
        "AccessDenied": "Access Denied"}.get(code, ""))
    with_cause = translate_boto_error(error)
    assert isinstance(with_cause, OSError) and with_cause.__cause__ is error
    assert is_retryable(with_cause) is expected
    if code in ("SlowDown", "ExpiredToken", "InternalError", "ServiceUnavailable", "NoSuchKey", "AccessDenied"):
        assert is_retryable(translate_boto_error(error, set_cause=False)) is expected


def test_botocore_connection_errors():
    from botocore import exceptions as b

    for exc in (b.EndpointConnectionError(endpoint_url="https://s3.amazonaws.com"),
                b.ConnectTimeoutError(endpoint_url="https://s3.amazonaws.com"),
                b.ReadTimeoutError(endpoint_url="https://s3.amazonaws.com"),
                b.ConnectionClosedError(endpoint_url="https://s3.amazonaws.com")):
        assert is_retryable(exc), exc
    assert not is_retryable(b.ParamValidationError(report="bad bucket name"))


def test_aiohttp_and_fsspec_errors():
    import aiohttp
    from fsspec.exceptions import FSTimeoutError

    assert is_retryable(aiohttp.ServerDisconnectedError())
    assert is_retryable(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert is_retryable(FSTimeoutError())


class FakeS3(http.server.BaseHTTPRequestHandler):
    """Answers every request with one S3 error document (as S3 does: no body for HEAD)."""

    status, code = 503, "SlowDown"

    def log_message(self, *args):
        pass

    def _reply(self, body: bool):
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
               f"<Message>error {self.code}</Message><RequestId>1</RequestId></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(xml)

    def do_HEAD(self):
        self._reply(False)

    def do_GET(self):
        self._reply(True)


@pytest.fixture(scope="module")
def fake_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, code, expected", [
    (503, "SlowDown", True), (500, "InternalError", True), (429, "TooManyRequests", True),
    (400, "ExpiredToken", True), (503, "ServiceUnavailable", True),
    (403, "AccessDenied", False), (404, "NoSuchKey", False), (416, "InvalidRange", False),
])
def test_errors_from_a_real_s3fs_call(fake_s3, monkeypatch, status, code, expected):
    """A GET through s3fs and botocore against a server that answers with S3 error documents."""
    import s3fs

    server, url = fake_s3
    monkeypatch.setattr(FakeS3, "status", status)
    monkeypatch.setattr(FakeS3, "code", code)
    fs = s3fs.S3FileSystem(endpoint_url=url, key="k", secret="s", skip_instance_cache=True,
                           config_kwargs={"retries": {"total_max_attempts": 1}})
    fs.retries = 1  # s3fs's own retry loop: once is enough to see the error
    exc = caught(lambda: fs.cat_file("bucket/video.mp4", start=0, end=100))
    assert isinstance(exc, OSError), exc
    assert is_retryable(exc) is expected, (type(exc), exc, exc.__cause__)


# --- retry_io ---------------------------------------------------------------------------------

class Flaky:
    def __init__(self, failures: int, exc: BaseException):
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def test_retry_io_succeeds_after_transient_failures():
    fn = Flaky(3, ConnectionResetError(errno.ECONNRESET, "reset"))
    start = time.monotonic()
    assert retry_io(fn, attempts=5, backoff_seconds=0.01, what="test") == "ok"
    assert fn.calls == 4
    assert time.monotonic() - start >= 0.01 + 0.02 + 0.04  # it backed off between the attempts


def test_retry_io_stops_at_attempts_and_raises_the_last_error():
    fn = Flaky(100, client_error("SlowDown", 503))
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="SlowDown"):
        retry_io(fn, attempts=3, backoff_seconds=0.001)
    assert fn.calls == 3


def test_retry_io_does_not_retry_permanent_errors():
    fn = Flaky(100, FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        retry_io(fn, attempts=5, backoff_seconds=0.001)
    assert fn.calls == 1
    once = Flaky(100, TimeoutError())
    with pytest.raises(TimeoutError):
        retry_io(once, attempts=1, backoff_seconds=0.001)
    assert once.calls == 1


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempt, base in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0)]:
        delays = [backoff_delay(attempt, 1.0) for _ in range(50)]
        assert all(base <= d <= base * 1.1 for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered


# --- configure_fsspec -------------------------------------------------------------------------

def test_configure_fsspec_sets_botocore_retries_and_keeps_user_settings(monkeypatch):
    import fsspec.config
    import s3fs

    monkeypatch.setitem(fsspec.config.conf, "s3", {"anon": True, "config_kwargs": {"read_timeout": 5}})
    configure_fsspec()
    configure_fsspec()  # idempotent
    kwargs = fsspec.config.conf["s3"]["config_kwargs"]
    assert kwargs == {"read_timeout": 5, "retries": {"max_attempts": 10, "mode": "standard"}, "connect_timeout": 10}
    assert fsspec.config.conf["s3"]["anon"] is True
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # fsspec applies the config as default kwargs
    assert fs.anon is True
    assert fs._prepare_config_kwargs() == {"read_timeout": 5, "retries": {"max_attempts": 10, "mode": "standard"}, "connect_timeout": 10}

    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"max_attempts": 3, "mode": "adaptive"}}})
    configure_fsspec()
    assert fsspec.config.conf["s3"]["config_kwargs"]["retries"] == {"max_attempts": 3, "mode": "adaptive"}
    assert fsspec.config.conf["s3"]["config_kwargs"]["read_timeout"] == 30


# --- probe ------------------------------------------------------------------------------------

def probe(cfg, path):
    return next(Probe(cfg).process([{"key": "x", "meta": {"source": {"path": path, "input_index": 0}}}]))


def test_probe_defers_an_unreachable_input_instead_of_calling_it_missing():
    """fsspec's HTTP reports a refused connection as FileNotFoundError; probe must not."""
    cfg = small_config(**{"sources.io_attempts": "3", "sources.io_backoff_seconds": "0.01"})
    got = probe(cfg, f"http://127.0.0.1:{closed_port()}/video.mp4")
    assert isinstance(got, Reject)
    assert (got.stage, got.reason, got.retryable) == ("probe", "io_error", True)
    assert "3 times" in got.detail


def test_probe_keeps_permanent_reasons(tmp_path):
    cfg = small_config(**{"sources.io_backoff_seconds": "0.01"})
    missing = probe(cfg, str(tmp_path / "absent.mp4"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    junk = probe(cfg, str(tmp_path / "junk.mp4"))
    assert (missing.reason, missing.retryable) == ("missing_file", False)
    assert (junk.reason, junk.retryable) == ("unreadable", False)
