"""The daemon's backlog: records noticed but not yet synced."""

from __future__ import annotations

import threading
import time
from pathlib import Path

Key = Path | str  # a local record's path, or an s3:// record's URI


class Backlog:
    """Records noticed but not yet synced: a coalescing set, bounded by the number of records.

    Events themselves are never queued: they stay in the record files and are read
    in bounded chunks when their record's turn comes, so memory stays flat
    whatever the backlog.
    """

    def __init__(self) -> None:
        self._since: dict[Key, float] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def add(self, path: Key, since: float | None = None) -> None:
        with self._lock:
            first = self._since.get(path)
            when = since if since is not None else time.time()
            if first is None or when < first:
                self._since[path] = when
        self.wake.set()

    def take(self, limit: int) -> list[tuple[Key, float]]:
        with self._lock:
            items = sorted(self._since.items(), key=lambda kv: kv[1])[:limit]
            for path, _ in items:
                del self._since[path]
            return items

    def oldest(self) -> float | None:
        with self._lock:
            return min(self._since.values(), default=None)

    def paths(self) -> list[Key]:
        with self._lock:
            return list(self._since)

    def __len__(self) -> int:
        with self._lock:
            return len(self._since)
