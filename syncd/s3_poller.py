"""Change notices for s3:// roots: a thread listing each root every ``s3_poll_interval``.

Each poll is a paginated ListObjectsV2 (one request per 1,000 keys) and reads
no object. An object whose (size, ETag, LastModified) differs from the previous
listing, or that disappeared, is noticed to the daemon's backlog; the first
listing notices every object (the engine skips the unchanged ones using the
listing, without a request). The latest listing is kept so the main loop can
build a record that needs no HEAD.

Faults stay with their root: a root that cannot be listed (missing bucket,
access denied, expired credentials, endpoint down) is logged with its name,
reported through ``on_status`` (``/readyz`` and the ``syncd_root_up`` gauge)
and polled again with exponential backoff; the other roots go on. After an
answer that blames the credentials (expired, unknown, mis-signed) the root's
client is made anew, so the next try reads the credential chain again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import structlog

from syncd.backfill import S3RunDirRef, s3_run_dirs
from syncd.config import Root
from syncd.logging import redact_text
from syncd.sources.s3 import (
    CREDENTIAL_CODES,
    S3Object,
    S3Record,
    S3SourceError,
    client_for,
    forget_client,
    glob_regex,
    list_records,
    posix_dirname,
    split_uri,
)

log = structlog.get_logger("syncd.s3")

MAX_BACKOFF = 300.0  # seconds between polls of a failing root, at most


class S3Poller:
    """One thread polling every s3:// root; ``notice(uri)`` for each changed record."""

    def __init__(
        self,
        roots: list[Root],
        notice: Callable[[str], None],
        *,
        interval: float,
        timeout: float,
        on_status: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.roots = [r for r in roots if r.is_s3]
        self.notice = notice
        self.interval = interval
        self.timeout = timeout
        self.on_status = on_status or (lambda _root, _error: None)
        self._seen: dict[str, dict[str, Hashable]] = {}
        self._latest: dict[str, S3Object] = {}
        self._root_of: dict[str, Root] = {}
        self._targets: dict[str, S3RunDirRef] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0  # completed polls of all roots (for tests and status)

    def start(self) -> None:
        if not self.roots:
            return
        self._thread = threading.Thread(target=self._run, name="s3-poller", daemon=True)
        self._thread.start()
        log.info("s3_polling", roots=[r.path for r in self.roots], interval_s=self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def lookup(self, uri: str) -> S3Object | None:
        with self._lock:
            return self._latest.get(uri)

    def derived_records(self) -> list[str]:
        """The records of the run directories listed under derived roots."""
        with self._lock:
            return [uri for uri in self._targets if uri in self._latest]

    def run_dir(self, uri: str) -> tuple[Root, S3RunDirRef] | None:
        """The run directory a derived root's record stands for (None: a plain record)."""
        with self._lock:
            target = self._targets.get(uri)
            root = self._root_of.get(uri)
        if target is None:
            return None
        if root is None:
            root = next(
                (r for r in self.roots if uri.startswith(r.path.rstrip("/") + "/")),
                self.roots[0],
            )
        return root, target

    def record(self, uri: str) -> S3Record:
        """The record at ``uri``, answering its first stat() from the latest listing."""
        with self._lock:
            listed = self._latest.get(uri)
            root = self._root_of.get(uri)
        if root is None:
            root = next(
                (r for r in self.roots if uri.startswith(r.path.rstrip("/") + "/")),
                self.roots[0],
            )
        return S3Record.from_uri(client_for(root, self.timeout), uri, listed)

    def _run(self) -> None:
        due = {root.path: 0.0 for root in self.roots}
        while not self._stop.is_set():
            now = time.monotonic()
            for root in self.roots:
                if self._stop.is_set():
                    return
                if due[root.path] <= now:
                    due[root.path] = time.monotonic() + self.poll(root)
            self.polls += 1
            self._stop.wait(max(0.01, min(due.values()) - time.monotonic()))

    def poll(self, root: Root) -> float:
        """List ``root`` once and notice what changed; seconds until its next poll."""
        started = time.perf_counter()
        try:
            client = client_for(root, self.timeout)
            if root.derived:
                listing, states, targets = derived_listing(root, client)
            else:
                listing = {obj.uri: obj for obj in list_records(client, root.path, root.pattern)}
                states, targets = dict(listing), {}
        except S3SourceError as exc:
            if exc.code in CREDENTIAL_CODES:
                forget_client(root, self.timeout)  # the next try reads the credentials anew
            failures = self._failures.get(root.path, 0) + 1
            self._failures[root.path] = failures
            reason = redact_text(exc.strerror or str(exc))[:500]
            delay = min(MAX_BACKOFF, self.interval * 2 ** (failures - 1))
            delay = random.uniform(delay / 2, delay) if failures > 1 else delay
            log.error(
                "root_unavailable",
                root=root.path,
                error=reason,
                attempt=failures,
                retry_in_s=round(delay, 1),
            )
            self.on_status(root.path, reason)
            return delay
        except Exception as exc:  # a poller that dies would silently stop noticing
            log.exception("root_poll_failed", root=root.path)
            self.on_status(root.path, redact_text(f"{type(exc).__name__}: {exc}")[:500])
            return self.interval
        if self._failures.pop(root.path, 0):
            log.info("root_recovered", root=root.path)
        self.on_status(root.path, None)
        previous = self._seen.get(root.path)
        changed = [
            uri for uri, state in states.items() if previous is None or previous.get(uri) != state
        ]
        gone = [uri for uri in previous or () if uri not in states]
        with self._lock:
            for uri in gone:
                self._latest.pop(uri, None)
                self._root_of.pop(uri, None)
            self._latest.update(listing)
            self._root_of.update(dict.fromkeys(listing, root))
            self._targets.update(targets)  # kept when gone: the record is derived still
        self._seen[root.path] = states
        for uri in changed + gone:
            self.notice(uri)
        log.debug(
            "s3_poll",
            root=root.path,
            objects=len(listing),
            changed=len(changed),
            gone=len(gone),
            seconds=round(time.perf_counter() - started, 3),
        )
        return self.interval


def derived_listing(
    root: Root, client: Any
) -> tuple[dict[str, S3Object], dict[str, Hashable], dict[str, S3RunDirRef]]:
    """One listing of a derived root (snapshot, dvclive, tensorboard): per run directory,
    its primary object, its state (every object under it: key, size, ETag,
    LastModified; any change to any of its files changes it) and where it is."""
    objects = list(list_records(client, root.path, "**"))
    _bucket, prefix = split_uri(root.path)
    base = f"{prefix}/" if prefix else ""
    regex = glob_regex(root.record_pattern)
    runs = s3_run_dirs(root, (o for o in objects if regex.fullmatch(o.key[len(base) :])))
    by_prefix = {(run.bucket, run.prefix): run for run in runs}
    files: dict[str, list[tuple[str, int, str, int]]] = {run.uri: [] for run in runs}
    for obj in objects:
        folder = posix_dirname(obj.key)
        while True:
            run = by_prefix.get((obj.bucket, folder))
            if run is not None:
                files[run.uri].append((obj.key, obj.size, obj.etag, obj.last_modified_ns))
            if not folder:
                break
            folder = posix_dirname(folder)
    by_uri = {obj.uri: obj for obj in objects}
    listing = {run.uri: by_uri[run.uri] for run in runs if run.uri in by_uri}
    states: dict[str, Hashable] = {uri: tuple(sorted(found)) for uri, found in files.items()}
    return listing, states, {run.uri: run for run in runs}
