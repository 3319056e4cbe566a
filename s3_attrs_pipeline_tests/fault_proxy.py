"""An HTTP proxy for tests that sits between a boto3 client and moto's S3 server and injects faults.

Every request is read completely, then either forwarded unchanged to the upstream (one upstream
connection per request: moto answers every request with `Connection: close` anyway) or answered
with a fault chosen by the first matching rule. Only the standard library is used, so the proxy
behaves the same wherever the tests run.

What botocore (1.44) makes of the faults on HEAD: S3 sends no body on HEAD, so botocore cannot
read an error code and uses the status code as the code: "503", "500", "403". It does not look at
an `x-amz-error-code` header; the proxy sends one anyway for people reading captures. For requests
with a body (GET, PUT, ...) the code comes from the XML body: "SlowDown", "InternalError",
"AccessDenied".

`s3_error` answers any status and code a rule names, e.g. S3's 400 ExpiredToken; `after_requests`
lets a rule's first matching requests through, so credentials can "expire" mid-run. `hold` keeps
each matching request until `release_held()`, then forwards it: a test sees which requests are in
progress at once (`held_paths()`), whatever the machine's speed.
"""

import contextlib
import dataclasses
import email.utils
import http.client
import http.server
import logging
import os
import random
import re
import secrets
import socket
import struct
import threading
import time
import urllib.parse

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "latency",
    "slowdown",
    "internal_error",
    "access_denied",
    "s3_error",
    "reset",
    "stall",
    "malformed_headers",
    "hold",
)

# (status, S3 error code, message) as S3 documents them.
_ERROR_RESPONSES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
}

# Meaningful for one connection only: the proxy keeps its own connection to the client and opens a
# fresh one to the upstream, and it answers `Expect: 100-continue` itself before reading the body.
_HOP_BY_HOP_REQUEST_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding", "expect"}
)
_HOP_BY_HOP_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding", "content-length"}
)

MALFORMED_ETAG = 'garbage "etag'
MALFORMED_LAST_MODIFIED = "not a date"

_UPSTREAM_TIMEOUT_S = 30.0
_STOP_JOIN_TIMEOUT_S = 2.0


@dataclasses.dataclass
class FaultRule:
    kind: str  # one of FAULT_KINDS
    rate: float = 1.0  # probability that a matching request gets the fault
    key_pattern: str | None = None  # regex searched in the percent-decoded URL path; None = every request
    method: str | None = None  # e.g. "HEAD"; None = any method
    latency_s: float = 0.0  # for "latency": extra delay before forwarding normally
    stall_s: float = 30.0  # for "stall": how long to hold the request before closing without an answer
    duration_s: float | None = None  # active only this long after add_rule; None = forever
    after_requests: int = 0  # the first this many requests the rule matches pass it by untouched
    # for "s3_error": the answer's status, and the error code and message of its XML body (none on HEAD)
    status: int = 400
    code: str = "InvalidRequest"
    message: str = ""


@dataclasses.dataclass
class _ActiveRule:
    rule: FaultRule
    key_regex: re.Pattern | None
    expires_at: float | None  # time.monotonic()
    matched: int = 0  # requests matched so far, to let the first `after_requests` by

    def matches(self, method: str, decoded_path: str, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return False
        if self.rule.method is not None and self.rule.method.upper() != method:
            return False
        return self.key_regex is None or self.key_regex.search(decoded_path) is not None


@dataclasses.dataclass
class _Decision:
    delay_s: float = 0.0
    delayed: bool = False
    fault: FaultRule | None = None


class FaultProxy:
    def __init__(self, upstream_url: str, *, seed: int = 0):
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream_url must be http(s)://host[:port], got {upstream_url!r}")
        self._upstream_connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[_ActiveRule] = []
        self._counters: dict[str, int] = {"requests": 0, "forwarded": 0} | dict.fromkeys(FAULT_KINDS, 0)
        self._request_times: list[float] = []
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._held: list[str] = []  # decoded paths of the requests a "hold" rule keeps right now
        self._server: http.server.ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        # Client connections being served, so stop() can wake handlers blocked on keep-alive reads.
        self._open_connections: dict[socket.socket, threading.Thread] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._stopping.clear()
        server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        server.fault_proxy = self
        self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._stopping.set()  # ends stalls and latencies in progress
        server.shutdown()
        server.server_close()
        with self._lock:
            open_connections = list(self._open_connections.items())
        for connection, _ in open_connections:
            # Its handler may have closed it in the meantime (a "reset" fault, or the client left).
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT_S
        for _, thread in open_connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        self._server = None
        self._serve_thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- rules and observations --------------------------------------------------------------

    def add_rule(self, rule: FaultRule) -> None:
        if rule.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {rule.kind!r}; expected one of {FAULT_KINDS}")
        if not 0.0 <= rule.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rule.rate}")
        key_regex = re.compile(rule.key_pattern) if rule.key_pattern is not None else None
        expires_at = time.monotonic() + rule.duration_s if rule.duration_s is not None else None
        with self._lock:
            self._rules.append(_ActiveRule(rule, key_regex, expires_at))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def held_paths(self) -> list[str]:
        """The decoded paths of the requests a "hold" rule is keeping, in arrival order."""
        with self._lock:
            return list(self._held)

    def release_held(self) -> None:
        """Forward every held request, and from now on let "hold" rules keep nothing (clear the rules
        before holding again)."""
        self._released.set()

    def stats(self) -> dict[str, int]:
        """Counters: "requests" received; "forwarded", answers that came from the upstream (delayed and
        malformed ones included); and per fault kind, the number of requests that got that fault."""
        with self._lock:
            return dict(self._counters)

    def request_times(self) -> list[float]:
        """time.monotonic() at which each request was received, in arrival order."""
        with self._lock:
            return list(self._request_times)

    # -- used by the handler -----------------------------------------------------------------

    def _record_request(self) -> None:
        with self._lock:
            self._counters["requests"] += 1
            self._request_times.append(time.monotonic())

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _decide(self, method: str, decoded_path: str) -> _Decision:
        decision = _Decision()
        now = time.monotonic()
        with self._lock:  # one lock for rules and dice keeps a seeded run reproducible per request order
            for active in self._rules:
                if not active.matches(method, decoded_path, now):
                    continue
                active.matched += 1
                if active.matched <= active.rule.after_requests:
                    continue
                if self._random.random() >= active.rule.rate:
                    continue
                if active.rule.kind == "latency":
                    decision.delay_s += active.rule.latency_s
                    decision.delayed = True
                    continue
                decision.fault = active.rule
                break
            if decision.delayed:
                self._counters["latency"] += 1
            if decision.fault is not None:
                self._counters[decision.fault.kind] += 1
        return decision

    def _register_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._open_connections[connection] = threading.current_thread()

    def _unregister_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._open_connections.pop(connection, None)

    def _open_upstream(self) -> http.client.HTTPConnection:
        return self._upstream_connection_class(self._upstream_host, self._upstream_port, timeout=_UPSTREAM_TIMEOUT_S)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's 5 drops connection attempts when a store opens its max_in_flight at once; the
    # kernel retries a dropped one a second later, which reorders requests the tests count.
    request_queue_size = 128
    fault_proxy: FaultProxy

    def handle_error(self, request, client_address) -> None:
        logger.exception("fault proxy: unexpected error while serving %s", client_address)


class _IncompleteRequest(Exception):
    """The client (or stop()) closed the connection before the request body was complete."""


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.server.fault_proxy._register_connection(self.connection)

    def finish(self) -> None:
        self.server.fault_proxy._unregister_connection(self.connection)
        super().finish()

    def log_message(self, format: str, *args) -> None:
        logger.debug("fault proxy: " + format, *args)

    def _handle(self) -> None:
        proxy = self.server.fault_proxy
        if proxy._stopping.is_set():
            self.close_connection = True
            return
        proxy._record_request()
        try:
            body, trailers = self._read_body()
        except _IncompleteRequest:
            self.close_connection = True
            return
        decoded_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        decision = proxy._decide(self.command, decoded_path)

        if decision.delay_s > 0 and proxy._stopping.wait(decision.delay_s):
            self.close_connection = True
            return
        kind = decision.fault.kind if decision.fault is not None else None
        if kind in _ERROR_RESPONSES:
            self._send_s3_error(*_ERROR_RESPONSES[kind])
        elif kind == "s3_error":
            self._send_s3_error(decision.fault.status, decision.fault.code, decision.fault.message)
        elif kind == "reset":
            self._reset_connection()
        elif kind == "hold":
            with proxy._lock:
                proxy._held.append(decoded_path)
            while not (proxy._released.wait(0.05) or proxy._stopping.is_set()):
                pass
            with proxy._lock:
                proxy._held.remove(decoded_path)
            if proxy._stopping.is_set():
                self.close_connection = True
            else:
                self._forward(body, trailers, malformed_headers=False)
        elif kind == "stall":
            # Event.wait returns at once when stop() sets it, so a stall never holds up shutdown.
            proxy._stopping.wait(decision.fault.stall_s)
            self.close_connection = True
        else:
            self._forward(body, trailers, malformed_headers=kind == "malformed_headers")

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _handle

    # -- request -----------------------------------------------------------------------------

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise _IncompleteRequest()
        return data

    def _read_line(self) -> bytes:
        line = self.rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise _IncompleteRequest()
        return line

    def _read_body(self) -> tuple[bytes | None, list[tuple[str, str]]]:
        """The request body (None when the request has none) and any chunked-encoding trailers."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self._read_line().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                chunks.append(self._read_exactly(size))
                self._read_exactly(2)  # CRLF after each chunk
            trailers = []
            while (line := self._read_line().strip()) != b"":
                name, _, value = line.decode("latin-1").partition(":")
                trailers.append((name.strip(), value.strip()))
            return b"".join(chunks), trailers
        content_length = self.headers.get("Content-Length")
        if content_length is None:
            return None, []
        return self._read_exactly(int(content_length)), []

    # -- answers -----------------------------------------------------------------------------

    def _forward(self, body: bytes | None, trailers: list[tuple[str, str]], *, malformed_headers: bool) -> None:
        upstream = self.server.fault_proxy._open_upstream()
        try:
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP_REQUEST_HEADERS:
                        upstream.putheader(name, value)
                # Sent de-chunked with a length: http.client cannot send trailers, so they go as headers.
                for name, value in trailers:
                    upstream.putheader(name, value)
                if body is not None and "Content-Length" not in self.headers:
                    upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                response_body = response.read()
            except (OSError, http.client.HTTPException) as error:
                logger.warning("fault proxy: upstream %s %s failed: %r", self.command, self.path, error)
                self._send_s3_error(502, "BadGateway", f"fault proxy could not reach the upstream: {error!r}")
                return
        finally:
            upstream.close()
        self.server.fault_proxy._count("forwarded")

        headers = [
            (name, value) for name, value in response.getheaders() if name.lower() not in _HOP_BY_HOP_RESPONSE_HEADERS
        ]
        if malformed_headers:
            headers = [(name, value) for name, value in headers if name.lower() not in ("etag", "last-modified")]
            headers += [("ETag", MALFORMED_ETAG), ("Last-Modified", MALFORMED_LAST_MODIFIED)]
        if self.command == "HEAD":
            # No body on HEAD, but the client wants the object's size from the upstream's header.
            upstream_length = response.getheader("Content-Length")
            if upstream_length is not None:
                headers.append(("Content-Length", upstream_length))
        elif response.status not in (204, 304):
            headers.append(("Content-Length", str(len(response_body))))
        self._send(response.status, response.reason, headers, response_body)

    def _send_s3_error(self, status: int, code: str, message: str) -> None:
        request_id = secrets.token_hex(8).upper()
        host_id = secrets.token_urlsafe(48)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>"
        ).encode()
        if self.command == "HEAD":
            body = b""  # like S3 and moto: an error to HEAD has no body, so botocore cannot see `code`
        headers = [
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", host_id),
            # botocore ignores this header; kept for people reading captures of HEAD errors.
            ("x-amz-error-code", code),
            ("Content-Type", "application/xml"),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Server", "FaultProxy"),
            ("Content-Length", str(len(body))),
        ]
        self._send(status, None, headers, body)

    def _send(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes) -> None:
        self.log_request(status)
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # Expected: the client gave up (e.g. its read timeout passed during a latency fault).
            self.close_connection = True

    def _reset_connection(self) -> None:
        """Close with SO_LINGER (on, 0 s) so the kernel sends RST instead of FIN: a connection reset."""
        self.close_connection = True
        self.server.fault_proxy._unregister_connection(self.connection)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # socket.close() would wait for rfile/wfile to let go of the socket, and the server's
        # shutdown(SHUT_WR) before that would send FIN. Detaching closes the descriptor right now
        # and leaves a socket object whose later shutdown/close are no-ops.
        os.close(self.connection.detach())
