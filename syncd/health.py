"""Health endpoints and Prometheus metrics: /healthz, /readyz, /metrics.

The HTTP server runs in its own thread and only reads a snapshot the main
loop keeps current, so a stuck main loop shows up as a stale heartbeat
(``/healthz`` 503) instead of a hung endpoint.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from syncd.ledger import STATES

log = structlog.get_logger("syncd.health")


class Metrics:
    """Every Prometheus metric syncd exports (names prefixed ``syncd_``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records = Gauge(
            "syncd_records", "Records known to the ledger, by state", ["state"], registry=r
        )
        self.events = Counter("syncd_events_applied", "Record events applied to MLflow", registry=r)
        self.metric_points = Counter(
            "syncd_metric_points_applied", "Metric points written to MLflow", registry=r
        )
        self.artifacts = Counter(
            "syncd_artifacts_uploaded", "Artifacts uploaded to MLflow", registry=r
        )
        self.record_errors = Counter(
            "syncd_record_errors", "Bad lines or entries reported in records", registry=r
        )
        self.sink_errors = Counter(
            "syncd_sink_errors", "MLflow writes that failed", ["kind"], registry=r
        )
        self.sink_retries = Counter("syncd_sink_retries", "MLflow calls retried", registry=r)
        self.record_failures = Counter(
            "syncd_record_failures",
            "Syncs of one record that failed and were contained (retried with backoff)",
            ["state"],
            registry=r,
        )
        self.backlog_records = Gauge(
            "syncd_backlog_records", "Records with changes not yet applied", registry=r
        )
        self.backlog_bytes = Gauge(
            "syncd_backlog_bytes", "Bytes of records not yet applied", registry=r
        )
        self.backlog_events = Gauge(
            "syncd_backlog_events",
            "Events not yet applied (estimated from backlog bytes and the mean line size)",
            registry=r,
        )
        self.oldest_unsynced = Gauge(
            "syncd_oldest_unsynced_event_age_seconds",
            "Age of the oldest change not yet applied",
            registry=r,
        )
        self.last_sync = Gauge(
            "syncd_last_sync_timestamp_seconds",
            "Time of the last successful write to MLflow",
            registry=r,
        )
        self.last_rescan = Gauge(
            "syncd_last_rescan_timestamp_seconds",
            "Time of the last full rescan of the roots",
            registry=r,
        )
        self.sink_up = Gauge("syncd_sink_up", "1 when MLflow accepts writes", registry=r)
        self.root_up = Gauge(
            "syncd_root_up", "1 when the s3:// root could be listed", ["root"], registry=r
        )
        self.root_errors = Counter(
            "syncd_root_poll_errors", "Failed listings of an s3:// root", ["root"], registry=r
        )
        self.batch_size = Histogram(
            "syncd_batch_size",
            "Events applied per write",
            registry=r,
            buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000),
        )
        self.write_duration = Histogram(
            "syncd_write_duration_seconds",
            "Duration of one record's write to MLflow",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        for state in STATES:
            self.records.labels(state=state).set(0)


@dataclass(slots=True)
class HealthState:
    """What the main loop reports; the HTTP thread only reads it."""

    heartbeat: float = field(default_factory=time.monotonic)
    ledger_open: bool = False
    ledger_error: str | None = None  # the last ledger failure, until a sync gets through
    sink_up: bool = False
    sink_error: str | None = None
    backlog_records: int = 0
    backlog_events: int = 0
    lag_seconds: float = 0.0
    last_sync_at: float | None = None
    error_count: int = 0
    watch_mode: str = "off"
    observer_alive: bool = True
    last_rescan_at: float | None = None
    stopping: bool = False
    root_errors: dict[str, str] = field(default_factory=dict)  # s3:// root -> why unlistable


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        state: HealthState,
        metrics: Metrics,
        *,
        stale_after: float,
        max_backlog: int,
        lock: threading.Lock,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.stale_after = stale_after
        self.max_backlog = max_backlog
        self.lock = lock
        handler = _handler_for(self)
        self.httpd = _BoundedServer((host, port), handler, bind_and_activate=False)
        self.httpd.address_family = _family_of(host)
        self.httpd.socket = socket.socket(self.httpd.address_family, socket.SOCK_STREAM)
        if self.httpd.address_family == socket.AF_INET6:
            # "[::]" serves IPv6 and, as usual on Linux, IPv4-mapped clients too
            self.httpd.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except OSError:
            self.httpd.server_close()
            raise
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        log.info("health_listening", address=f"{self.address[0]}:{self.address[1]}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def body(self) -> dict[str, Any]:
        with self.lock:
            snap = asdict(self.state)
        age = time.monotonic() - snap.pop("heartbeat")
        snap["heartbeat_age_seconds"] = round(age, 3)
        return snap

    def live(self, body: dict[str, Any]) -> tuple[bool, list[str]]:
        reasons = []
        if body["heartbeat_age_seconds"] > self.stale_after:
            reasons.append(f"main loop heartbeat is {body['heartbeat_age_seconds']:.1f}s old")
        if not body["observer_alive"]:
            reasons.append("file watcher thread died")
        return not reasons, reasons

    def ready(self, body: dict[str, Any]) -> tuple[bool, list[str]]:
        _, reasons = self.live(body)
        if not body["ledger_open"]:
            reasons.append("ledger is not open")
        if body.get("ledger_error"):
            reasons.append(f"ledger failing: {body['ledger_error']}")
        if not body["sink_up"]:
            reasons.append(f"MLflow unreachable: {body['sink_error'] or 'not checked yet'}")
        if body["backlog_events"] > self.max_backlog:
            reasons.append(f"backlog of {body['backlog_events']} events over {self.max_backlog}")
        for root, error in sorted(body["root_errors"].items()):
            reasons.append(f"root {root} unavailable: {error}")
        if body["stopping"]:
            reasons.append("stopping")
        return not reasons, reasons


MAX_CONNECTIONS = 16  # concurrent health requests; more are closed at once
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request


class _BoundedServer(ThreadingHTTPServer):
    """A threading server with a cap on concurrent connections (a slow scraper or a
    port scan cannot pile up threads)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _family_of(host: str) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return socket.AF_INET
    return infos[0][0] if infos else socket.AF_INET


def _handler_for(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    checks: dict[str, Callable[[dict[str, Any]], tuple[bool, list[str]]]] = {
        "/healthz": server.live,
        "/readyz": server.ready,
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "syncd"
        timeout = REQUEST_TIMEOUT

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                return
            check = checks.get(path)
            if check is None:
                self._send(404, b'{"error": "not found"}\n', "application/json")
                return
            body = server.body()
            ok, reasons = check(body)
            body["status"] = "ok" if ok else "fail"
            body["reasons"] = reasons
            payload = (json.dumps(body) + "\n").encode()
            self._send(200 if ok else 503, payload, "application/json")

        def _send(self, code: int, payload: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # polled every few seconds: not worth a log line each

    return Handler
