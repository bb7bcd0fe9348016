"""The tracking store itself: SQLite paths, the interprocess lock, opening the client.

For a SQLite store syncd creates the store atomically, refuses a schema its
MLflow does not write (syncd.store_schema), anchors artifacts beside the
database, and serialises its writes with a lock file beside it so several
syncd processes never contend for it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from syncd.errors import TransientSinkError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = structlog.get_logger("syncd.sink")


def is_sqlite_uri(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return Path(path) if path and path != ":memory:" else None


def default_artifact_root(tracking_uri: str) -> str | None:
    """Where artifacts of a SQLite store go: ``mlartifacts`` beside the database.

    MLflow's own default is ``./mlruns`` of whatever folder the process runs in.
    """
    db = sqlite_path(tracking_uri)
    return str(db.absolute().parent / "mlartifacts") if db else None


@contextmanager
def _anchored_artifacts(root: str | None) -> Iterator[None]:
    """Build a SQLite store whose default artifact root (experiment 0's) is ``root``.

    MLflow reads the root for stores built without one from this variable
    (``_get_sqlalchemy_store``); it is set only while the client is built.
    """
    name = "_MLFLOW_SERVER_ARTIFACT_ROOT"
    if root is None or name in os.environ:
        yield
        return
    os.environ[name] = root
    try:
        yield
    finally:
        os.environ.pop(name, None)


class StoreLock:
    """An interprocess lock (flock) beside a SQLite store; re-entrant within a thread.

    Waiting for it is bounded: past ``timeout`` the write is a transient failure
    (the record waits and is retried) instead of a daemon that hangs.
    """

    def __init__(self, path: Path, timeout: float = 300.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.RLock()
        self._fd: int | None = None
        self._depth = 0
        self._owner: int | None = None

    @property
    def owned(self) -> bool:
        return self._owner == threading.get_ident() and self._depth > 0

    def acquire_within(self) -> None:
        """Take the lock (one level), polling up to ``timeout``; TransientSinkError after."""
        self._local.acquire()
        try:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                deadline = time.monotonic() + self.timeout
                delay = 0.005
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            os.close(fd)
                            raise TransientSinkError(
                                f"the store lock {self.path} was held by another process"
                                f" for over {self.timeout:.0f}s"
                            ) from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.25)
                self._fd = fd
                self._owner = threading.get_ident()
            self._depth += 1
        except BaseException:
            self._local.release()
            raise

    def release_once(self) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
                self._owner = None
        finally:
            self._local.release()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire_within()
        try:
            yield
        finally:
            self.release_once()


def open_client(tracking_uri: str, artifact_root: str | None) -> MlflowClient:
    """Build the client; a missing SQLite store is created first, a foreign one refused."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None:
        from syncd.store_schema import check_store, create_store

        if create_store(db):
            log.info("store_created", store=str(db))
        check_store(db)
    with _anchored_artifacts(artifact_root):
        return MlflowClient(tracking_uri=tracking_uri)
