"""Change notices for local roots: watchdog (inotify or polling) plus periodic rescans.

The handler only matches the glob and says "record R may have changed"; it
never reads, parses or raises. A periodic full rescan catches what the
observer misses (inotify queue overflow, watch limits, network filesystems).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from syncd.config import Root
from syncd.sources.local import find_records

log = structlog.get_logger("syncd.watch")

Notice = Callable[[Path], None]


class RecordEventHandler(FileSystemEventHandler):
    """Turns file system events under one root into record notices."""

    def __init__(self, root: Root, notice: Notice) -> None:
        self.root = root
        self.notice = notice
        self.base = Path(root.path)
        self.pattern = root.record_pattern
        self.name_glob = self.pattern.rpartition("/")[2] or self.pattern

    def _matches(self, path: Path) -> bool:
        if not fnmatch.fnmatchcase(path.name, self.name_glob):
            return False
        if self.pattern.startswith("**/"):  # any depth: the name decides
            return True
        try:
            return path.relative_to(self.base).match(self.pattern)
        except ValueError:
            return False

    def _snapshot_record(self, path: Path) -> Path | None:
        """For a snapshot or DVCLive root: the primary file of the run directory holding
        ``path`` (any file of a run directory may feed its record)."""
        if not self.root.derived or not self.pattern.startswith("**/"):
            return None
        for folder in path.parents:
            if folder == self.base or not folder.is_relative_to(self.base):
                break
            primary = folder / self.name_glob
            if primary.is_file():
                return primary
        return None

    def _consider(self, raw: str | bytes, is_directory: bool) -> None:
        path = Path(raw.decode() if isinstance(raw, bytes) else raw)
        if is_directory:
            # A run directory moved or copied in whole: its records got no events of their own.
            for record in find_records(path, self.pattern):
                self.notice(record)
        elif self._matches(path):
            self.notice(path)
        elif (primary := self._snapshot_record(path)) is not None:
            self.notice(primary)

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type in ("created", "modified", "closed"):
                if not event.is_directory or event.event_type == "created":
                    self._consider(event.src_path, event.is_directory)
            elif event.event_type == "moved":
                self._consider(
                    getattr(event, "dest_path", "") or event.src_path, event.is_directory
                )
            elif event.event_type == "deleted" and not event.is_directory:
                self._consider(event.src_path, False)
        except Exception:  # a handler that raises would stop watchdog's delivery
            log.exception("watch_handler_failed", path=str(event.src_path))


class _OverflowAlarm(logging.Handler):
    """watchdog reports a kernel inotify queue overflow only as a log record: act on it."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


_INOTIFY_LOGGERS = ("watchdog.observers.inotify", "watchdog.observers.inotify_c")


class Watcher:
    """One observer over every local root; falls back to polling where inotify fails.

    ``on_overflow`` is called when the kernel dropped events (inotify queue
    overflow): the caller should rescan, since some changes went unseen.
    """

    def __init__(
        self,
        roots: list[Root],
        notice: Notice,
        *,
        mode: str,
        poll_interval: float,
        on_overflow: Callable[[], None] | None = None,
    ):
        self.roots = [r for r in roots if not r.is_s3]
        self.notice = notice
        self.mode = mode
        self.poll_interval = poll_interval
        self.observer: Any = None
        self.active_mode = "off"
        self._alarm = _OverflowAlarm(on_overflow) if on_overflow else None

    def start(self) -> None:
        if not self.roots:
            return
        if self.mode == "polling":
            self._start(polling=True)
            return
        try:
            self._start(polling=False)
        except OSError as exc:
            if self.mode == "inotify":
                raise
            reason = (
                "inotify watch limit reached (raise fs.inotify.max_user_watches)"
                if exc.errno == errno.ENOSPC
                else f"inotify unavailable: {exc}"
            )
            log.warning("watch_falling_back_to_polling", reason=reason)
            self._start(polling=True)

    def _start(self, *, polling: bool) -> None:
        observer: Any = PollingObserver(timeout=self.poll_interval) if polling else Observer()
        for root in self.roots:
            observer.schedule(RecordEventHandler(root, self.notice), root.path, recursive=True)
        observer.daemon = True
        observer.start()
        if self._alarm is not None:
            for name in _INOTIFY_LOGGERS:
                logging.getLogger(name).addHandler(self._alarm)
        self.observer = observer
        self.active_mode = "polling" if polling else "inotify"
        log.info("watching", mode=self.active_mode, roots=[r.path for r in self.roots])

    @property
    def alive(self) -> bool:
        return self.observer is None or bool(self.observer.is_alive())

    def stop(self) -> None:
        if self._alarm is not None:
            for name in _INOTIFY_LOGGERS:
                logging.getLogger(name).removeHandler(self._alarm)
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
