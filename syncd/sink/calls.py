"""Calling MLflow: error mapping, retries with backoff, deadlines, the store lock.

Every MLflow, SQLAlchemy, requests and botocore error is mapped to the syncd
error tree here, in one place (:func:`classify`). Every call runs under
``bounded(what, seconds)`` so the daemon's supervisor keeps the watchdog fed
while a call is within its deadline.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from syncd.errors import (
    PermanentSinkError,
    SinkAccessDenied,
    SinkError,
    ThrottledSinkError,
    TransientSinkError,
)
from syncd.sink.store import StoreLock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = structlog.get_logger("syncd.sink")
T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "Connection refused")
_AUTH_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"})
# MLflow's REST client gives up on a 429 inside urllib3, whose error keeps no reply headers.
_THROTTLED_TEXT = ("too many 429 error responses", "error code 429")
_TLS_TEXT = ("CERTIFICATE_VERIFY_FAILED", "SSLCertVerificationError")
_CREDENTIALS_HINT = (
    "MLflow refused syncd's credentials ({what}); check MLFLOW_TRACKING_TOKEN, or"
    " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
)
_TLS_HINT = (
    "the tracking server's TLS certificate is not trusted; set MLFLOW_TRACKING_SERVER_CERT_PATH"
    " to the CA bundle that signed it"
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; ``attempts`` tries in all.

    A throttled call (429) waits what the server's ``Retry-After`` asks, up to
    ``max_retry_after``; without one, a backoff that starts at ``throttle_delay``.
    """

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0
    throttle_delay: float = 1.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, err: SinkError | None = None) -> float:
        if isinstance(err, ThrottledSinkError):
            if err.retry_after is not None:
                return min(max(err.retry_after, 0.0), self.max_retry_after)
            ceiling = min(self.max_retry_after, self.throttle_delay * 2**attempt)
            return random.uniform(ceiling / 2, ceiling)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def _http_status(exc: BaseException) -> int | None:
    """The status of a ``requests`` HTTPError's reply (artifact uploads raise these)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from the reply's Retry-After header (delta-seconds or an HTTP date)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(exc: BaseException) -> SinkError:
    """Map an MLflow / SQLAlchemy / HTTP / S3 error to a transient or permanent SinkError."""
    if isinstance(exc, SinkError):
        return exc
    text = str(exc)
    name = type(exc).__name__
    module = type(exc).__module__
    code = getattr(exc, "error_code", None)
    status = _http_status(exc)
    if status in (401, 403) or code in _AUTH_CODES:
        what = f"HTTP {status}" if status else str(code)
        return SinkAccessDenied(f"{_CREDENTIALS_HINT.format(what=what)}: {text}")
    if any(t in text for t in _TLS_TEXT):
        return SinkAccessDenied(f"{_TLS_HINT}: {text}")
    if status == 429 or code == "REQUEST_LIMIT_EXCEEDED" or any(t in text for t in _THROTTLED_TEXT):
        return ThrottledSinkError(
            f"throttled by MLflow (HTTP 429): {text}", retry_after=_retry_after(exc)
        )
    if status is not None and 400 <= status < 500 and status != 408:
        return PermanentSinkError(f"{name}: {text}")
    if any(t in text for t in _TRANSIENT_TEXT):
        return TransientSinkError(text)
    if code is not None:  # MlflowException and RestException
        if code in _TRANSIENT_CODES:
            return TransientSinkError(text)
        return PermanentSinkError(text)
    if module.startswith(("requests", "urllib3", "botocore", "boto3")) or name in (
        "OperationalError",
        "TimeoutError",
        "ConnectionError",
    ):
        return TransientSinkError(f"{name}: {text}")
    if isinstance(exc, OSError):
        return TransientSinkError(f"{name}: {text}")
    return PermanentSinkError(f"{name}: {text}")


class Bounded(Protocol):
    def __call__(self, what: str, seconds: float) -> AbstractContextManager[None]: ...


@contextmanager
def unbounded(what: str, seconds: float) -> Iterator[None]:
    """No supervisor: calls are bounded by their own timeouts only."""
    yield


class Calls:
    """The MLflow client of one sink, and every call made through it."""

    def __init__(
        self,
        open_client: Callable[[], MlflowClient],
        *,
        retry: RetryPolicy,
        bounded: Bounded,
        call_deadline: float,
        lock: StoreLock | None,
    ) -> None:
        self._open_client = open_client
        self.retry = retry
        self.bounded = bounded
        self.call_deadline = call_deadline
        self.lock = lock
        self._client: MlflowClient | None = None
        self._retries = 0

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            # syncd retries itself (with backoff it controls) and owns the log format.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
            # Building the client opens (and for a new SQLite store, creates) the store:
            # its errors are sink errors like any call's.
            with self.serialised():
                self._client = self.call("open tracking store", self._open_client)
        return self._client

    @contextmanager
    def serialised(self) -> Iterator[None]:
        if self.lock is None:
            yield
            return
        if self.lock.owned:  # re-entered: no wait
            self.lock.acquire_within()
        else:
            with self.bounded("waiting for the store lock", self.lock.timeout + 5):
                self.lock.acquire_within()
        try:
            yield
        finally:
            self.lock.release_once()

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call MLflow, retrying transient failures with backoff; raise SinkError otherwise."""
        attempt = 0
        while True:
            try:
                with self.bounded(what, self.call_deadline):
                    return fn(*args, **kwargs)
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, PermanentSinkError) or attempt + 1 >= self.retry.attempts:
                    raise err from exc
                self.note_retry(what, attempt, err)
                attempt += 1

    def note_retry(self, what: str, attempt: int, err: SinkError) -> None:
        """Log and count a retry, then wait out its backoff (or the server's Retry-After)."""
        delay = self.retry.delay(attempt, err)
        log.warning(
            "sink_retry",
            call=what,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
            error=str(err)[:300],
        )
        self._retries += 1
        with self.bounded(f"backing off before retrying {what}", delay + 5):
            time.sleep(delay)

    def take_retries(self) -> int:
        """Calls retried since the last time this was asked (for the retries counter)."""
        count, self._retries = self._retries, 0
        return count
