"""Calling MLflow: error mapping, retries with backoff, deadlines, the store lock.

Every MLflow, SQLAlchemy, requests and botocore error is mapped to the syncd
error tree here, in one place (:func:`classify`). Every call runs under
``bounded(what, seconds)`` so the daemon's supervisor keeps the watchdog fed
while a call is within its deadline.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from syncd.errors import PermanentSinkError, SinkError, TransientSinkError
from syncd.sink.store import StoreLock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = structlog.get_logger("syncd.sink")
T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "Connection refused")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; ``attempts`` tries in all."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def classify(exc: BaseException) -> SinkError:
    """Map an MLflow / SQLAlchemy / HTTP / S3 error to a transient or permanent SinkError."""
    if isinstance(exc, SinkError):
        return exc
    text = str(exc)
    name = type(exc).__name__
    module = type(exc).__module__
    code = getattr(exc, "error_code", None)
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
        """Log and count a retry, then wait out its backoff."""
        delay = self.retry.delay(attempt)
        log.warning(
            "sink_retry",
            call=what,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
            error=str(err)[:300],
        )
        self._retries += 1
        time.sleep(delay)

    def take_retries(self) -> int:
        """Calls retried since the last time this was asked (for the retries counter)."""
        count, self._retries = self._retries, 0
        return count
