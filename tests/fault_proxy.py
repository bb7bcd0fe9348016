"""A fault-injecting HTTP/1.1 proxy for tests, standard library only.

``FaultProxy(upstream_port)`` listens on a free loopback port and forwards every
request to the upstream server (one upstream connection per call; every reply
to the client carries ``Connection: close``, so a switch of mode applies to the
very next call). Faults can be switched at run time from any thread:

- :meth:`FaultProxy.refuse`: the listening socket is closed, connects are refused
  (``reset=True`` keeps listening but resets every new connection instead);
  :meth:`FaultProxy.accept` listens again on the same port.
- :meth:`FaultProxy.fail_with_503`: every Nth matching call is answered 503
  (TEMPORARILY_UNAVAILABLE) without reaching the upstream;
  :meth:`FaultProxy.fail_with` answers another status with a given body (an S3
  XML error such as ``ExpiredToken``).
- :meth:`FaultProxy.throttle`: every Nth matching call is answered 429 (Too Many
  Requests, with a ``Retry-After`` header) without reaching the upstream.
- :meth:`FaultProxy.require_authorization`: a call whose ``Authorization`` header
  is not the expected one is answered 401, like an authenticating reverse proxy.
- ``FaultProxy(port, tls=context)``: the proxy terminates TLS (an ``https://`` URL).
- :meth:`FaultProxy.lose_replies`: every Nth matching call is forwarded, the
  upstream's reply is read, and the client connection is reset without an answer:
  the upstream applied the call, the client cannot know.
- :meth:`FaultProxy.stall`: matching calls are held for some seconds, or until
  :meth:`FaultProxy.release`, before they are forwarded.

Rules match a regular expression searched in the URL path (``None``: every
path), optionally only some HTTP methods, and combine: a call may be stalled, then answered 503 or have its reply
lost. Calls are counted per path (``calls``) and per fault (``faults``).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

# Headers that belong to one connection, never forwarded (RFC 9110, 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",  # recomputed: bodies are forwarded whole
    }
)
MAX_STALL = 300.0  # a stall "until released" still ends: a forgotten release cannot hang a run
UPSTREAM_TIMEOUT = 120.0


class Fault(Enum):
    REFUSED = "refused"  # connection reset by reset-mode refusal (the path is unknown)
    STALL = "stall"
    ERROR_503 = "503"
    ERROR = "error"  # another status than 503, with the rule's body
    ERROR_429 = "429"
    UNAUTHORIZED = "401"
    LOSE_REPLY = "lose_reply"


@dataclass(slots=True)
class Rule:
    """A fault applied to every ``every``-th call whose path matches ``path``."""

    kind: Fault
    path: re.Pattern[str] | None = None
    every: int = 1
    first_per_body: bool = False  # count only the first call with a given body (not retries)
    seconds: float | None = None  # STALL: how long; None holds until released
    methods: frozenset[str] | None = None  # HTTP methods that match (None: every method)
    reply: tuple[str, bytes] | None = None  # ERROR_503: (content type, body) instead of JSON
    status: tuple[int, str] = (503, "Service Unavailable")  # ERROR: the status answered
    retry_after: str | None = None  # ERROR_429: the Retry-After header's value
    released: threading.Event = field(default_factory=threading.Event)
    matched: int = 0
    _bodies: set[bytes] = field(default_factory=set)

    def fires(self, path: str, body: bytes, method: str = "GET") -> bool:
        """Count the call if it matches; True when this one gets the fault (caller holds the lock)."""
        if self.path is not None and not self.path.search(path):
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.first_per_body:
            if body in self._bodies:
                return False
            self._bodies.add(body)
        self.matched += 1
        return self.matched % self.every == 0


@dataclass(slots=True)
class _Decision:
    refuse: bool = False
    stalls: list[Rule] = field(default_factory=list)
    error: bool = False  # answered by the proxy (503 or the rule's status)
    reply: tuple[str, bytes] | None = None
    status: tuple[int, str] = (503, "Service Unavailable")
    throttled: Rule | None = None
    unauthorized: bool = False
    lose_reply: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.proxy._reset_new_connections():
            _reset(request)
            return False
        return True


class FaultProxy:
    """A switchable fault-injecting proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: a server-side context; the proxy then speaks HTTPS to its clients."""
        self.upstream = (upstream_host, upstream_port)
        self.tls = tls
        self._authorization: str | None = None
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._resetting = False
        self._calls: Counter[str] = Counter()
        self._faults: Counter[tuple[Fault, str]] = Counter()
        self._held = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._listen()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        server = _Server(("127.0.0.1", self.port), self)
        if self.tls is not None:  # the handshake runs in the handler thread, on first read
            server.socket = self.tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = int(server.server_address[1])
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def close(self) -> None:
        self.release()
        self._unlisten()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- switching ------------------------------------------------------------------------

    def pass_through(self) -> None:
        """No faults: accept connections, drop every rule, release stalled calls."""
        self.release()
        with self._lock:
            self._rules.clear()
            self._resetting = False
        self.accept()

    def refuse(self, *, reset: bool = False) -> None:
        """Refuse connections: close the listening socket, or (``reset``) reset each one."""
        with self._lock:
            self._resetting = reset
        if not reset:
            self._unlisten()

    def accept(self) -> None:
        """Accept connections again (on the same port)."""
        with self._lock:
            self._resetting = False
        if self._server is None:
            self._listen()

    @property
    def refusing(self) -> bool:
        return self._server is None or self._reset_new_connections()

    def add(self, rule: Rule) -> Rule:
        if rule.every < 1:
            raise ValueError("every must be >= 1")
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail_with_503(
        self,
        every: int = 1,
        path: str | None = None,
        *,
        methods: tuple[str, ...] | None = None,
        reply: tuple[str, bytes] | None = None,
        first_per_body: bool = False,
    ) -> Rule:
        """Answer every ``every``-th matching call 503; ``reply`` is (content type, body)
        (default: MLflow's JSON), ``methods`` limits the rule to some HTTP methods,
        ``first_per_body`` counts only the first call with a given body (never a retry)."""
        allowed = frozenset(m.upper() for m in methods) if methods is not None else None
        return self.add(
            Rule(
                Fault.ERROR_503,
                _compile(path),
                every,
                first_per_body,
                methods=allowed,
                reply=reply,
            )
        )

    def throttle(
        self,
        every: int = 1,
        path: str | None = None,
        *,
        retry_after: str | None = "1",
        first_per_body: bool = False,
    ) -> Rule:
        """Answer every ``every``-th matching call 429 with ``Retry-After: retry_after``
        (None: no header), as a rate-limiting gateway does."""
        return self.add(
            Rule(Fault.ERROR_429, _compile(path), every, first_per_body, retry_after=retry_after)
        )

    def require_authorization(self, value: str | None) -> None:
        """Answer 401 to every call whose ``Authorization`` header is not ``value``
        (None: no check). The 401's body quotes what the client presented, as careless
        servers do, so a test can see that a client does not log replies verbatim."""
        with self._lock:
            self._authorization = value

    def fail_with(
        self,
        status: int,
        reason: str,
        reply: tuple[str, bytes],
        path: str | None = None,
        *,
        every: int = 1,
        methods: tuple[str, ...] | None = None,
    ) -> Rule:
        """Answer every ``every``-th matching call with ``status`` and ``reply`` (content
        type, body), without reaching the upstream."""
        allowed = frozenset(m.upper() for m in methods) if methods is not None else None
        return self.add(
            Rule(
                Fault.ERROR,
                _compile(path),
                every,
                methods=allowed,
                reply=reply,
                status=(status, reason),
            )
        )

    def lose_replies(
        self, every: int = 1, path: str | None = None, *, first_per_body: bool = False
    ) -> Rule:
        return self.add(Rule(Fault.LOSE_REPLY, _compile(path), every, first_per_body))

    def stall(
        self,
        seconds: float | None = None,
        path: str | None = None,
        every: int = 1,
        *,
        methods: tuple[str, ...] | None = None,
    ) -> Rule:
        allowed = frozenset(m.upper() for m in methods) if methods is not None else None
        return self.add(Rule(Fault.STALL, _compile(path), every, seconds=seconds, methods=allowed))

    def remove(self, rule: Rule) -> None:
        rule.released.set()
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def release(self) -> None:
        """Let every stalled call go on, and stop stalling new ones."""
        with self._lock:
            stalls = [r for r in self._rules if r.kind is Fault.STALL]
            self._rules = [r for r in self._rules if r.kind is not Fault.STALL]
        for rule in stalls:
            rule.released.set()

    # -- counters -------------------------------------------------------------------------

    @property
    def calls(self) -> Counter[str]:
        """Calls that reached the proxy, per URL path (faulted ones included)."""
        with self._lock:
            return Counter(self._calls)

    @property
    def faults(self) -> Counter[tuple[Fault, str]]:
        """Faults injected, per (kind, URL path)."""
        with self._lock:
            return Counter(self._faults)

    def fault_count(self, kind: Fault, path: str | None = None) -> int:
        return sum(
            n for (k, p), n in self.faults.items() if k is kind and (path is None or path in p)
        )

    @property
    def held(self) -> int:
        """Calls stalled right now."""
        with self._lock:
            return self._held

    # -- the request path (handler threads) ---------------------------------------------------

    def _reset_new_connections(self) -> bool:
        with self._lock:
            if self._resetting:
                self._faults[(Fault.REFUSED, "")] += 1
            return self._resetting

    def _decide(
        self, path: str, body: bytes, method: str = "GET", authorization: str | None = None
    ) -> _Decision:
        decision = _Decision()
        with self._lock:
            self._calls[path] += 1
            if self._resetting:
                self._faults[(Fault.REFUSED, path)] += 1
                decision.refuse = True
                return decision
            if self._authorization is not None and authorization != self._authorization:
                self._faults[(Fault.UNAUTHORIZED, path)] += 1
                decision.unauthorized = True
                return decision
            for rule in self._rules:
                if not rule.fires(path, body, method):
                    continue
                self._faults[(rule.kind, path)] += 1
                if rule.kind is Fault.STALL:
                    decision.stalls.append(rule)
                elif rule.kind in (Fault.ERROR_503, Fault.ERROR):
                    if not decision.error:
                        decision.status = rule.status
                    decision.error = True
                    decision.reply = decision.reply or rule.reply
                elif rule.kind is Fault.ERROR_429:
                    decision.throttled = decision.throttled or rule
                else:
                    decision.lose_reply = True
        return decision

    def _hold(self, rules: list[Rule]) -> None:
        with self._lock:
            self._held += 1
        try:
            for rule in rules:
                rule.released.wait(MAX_STALL if rule.seconds is None else rule.seconds)
        finally:
            with self._lock:
                self._held -= 1

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _proxy(self) -> None:
        self.close_connection = True
        proxy = self.server.proxy
        body = self._read_body()
        path = urlsplit(self.path).path
        presented = self.headers.get("Authorization")
        decision = proxy._decide(path, body, self.command, presented)
        if decision.refuse:
            _reset(self.connection)
            return
        if decision.unauthorized:
            echo = f"401 Unauthorized: credentials {presented!r} are not valid here"
            self._reply(
                401,
                "Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="mlflow"')],
                echo.encode(),
            )
            return
        if decision.stalls:
            proxy._hold(decision.stalls)
        if decision.throttled is not None:
            retry_after = decision.throttled.retry_after
            headers = [("Content-Type", "application/json")]
            if retry_after is not None:
                headers.append(("Retry-After", retry_after))
            payload = b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "injected 429"}'
            self._reply(429, "Too Many Requests", headers, payload)
            return
        if decision.error:
            content_type, payload = decision.reply or (
                "application/json",
                b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected 503"}',
            )
            self._reply(*decision.status, [("Content-Type", content_type)], payload)
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        try:
            status, reason, resp_headers, data = proxy._forward(
                self.command, self.path, headers, body
            )
        except OSError as exc:
            self._reply(502, "Bad Gateway", [("Content-Type", "text/plain")], str(exc).encode())
            return
        if decision.lose_reply:
            _reset(self.connection)  # the upstream applied it; the client never hears
            return
        kept = [(k, v) for k, v in resp_headers if k.lower() not in _HOP_BY_HOP]
        # A reply to HEAD has no body but the length of the body a GET would get.
        length = next((v for k, v in resp_headers if k.lower() == "content-length"), None)
        self._reply(status, reason, kept, data, length=length if self.command == "HEAD" else None)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _proxy

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        length: str | None = None,
    ) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in ("date", "server", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", length if length is not None else str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _compile(path: str | None) -> re.Pattern[str] | None:
    return re.compile(path) if path is not None else None


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer sees the connection torn down."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
