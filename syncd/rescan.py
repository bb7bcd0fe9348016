"""The daemon's safety net: find every record that changed since the ledger last saw it.

Watch events and S3 polls notice most changes as they happen; a rescan, at
start, on an interval and after lost watch events, catches the rest: records
whose size or mtime differs from the ledger, waiting or failed records whose
backoff has passed, derived run directories (compared with their last
translation, cheap when unchanged; an idle DVCLive or TensorBoard run gets its
end) and deleted files (which become ``gone``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.backfill import iter_record_files
from syncd.backlog import Backlog, Key
from syncd.config import Settings
from syncd.errors import ConfigError
from syncd.ledger import RETRY_STATES, Ledger, RecordRow
from syncd.s3_poller import S3Poller
from syncd.snapshot.derived import recheck_due
from syncd.sources.local import path_from_uri


@dataclass
class Rescan:
    """What one rescan did: the notices it queued, out of the records the ledger knows."""

    queued: int = 0
    known: int = 0
    error: str | None = None  # a root could not be walked (what was found before stays queued)


def rescan(
    settings: Settings,
    ledger: Ledger,
    poller: S3Poller | None,
    backlog: Backlog,
    offsets: dict[Key, int],
    retry_due: dict[Key, float],
) -> Rescan:
    """Queue on ``backlog`` every record that needs a sync.

    ``retry_due`` gets each waiting or failed record whose backoff has not passed
    (its next try), and ``offsets`` the ledger's offset of each local record it had
    not seen (for the backlog gauges).
    """
    known = ledger.all_records()
    found = Rescan(known=len(known))

    def queue(key: Key) -> None:
        backlog.add(key)
        found.queued += 1

    try:
        _walk(settings, known, poller, queue, offsets, retry_due)
    except ConfigError as exc:
        found.error = str(exc)
    return found


def _walk(
    settings: Settings,
    known: dict[str, RecordRow],
    poller: S3Poller | None,
    queue: Callable[[Key], None],
    offsets: dict[Key, int],
    retry_due: dict[Key, float],
) -> None:
    for root, path in iter_record_files(settings.roots):
        row = known.get(path.as_uri())
        offsets.setdefault(path, row.offset if row else 0)
        if row is not None and row.state in RETRY_STATES:
            due = row.next_attempt_at or 0.0
            if due > time.time():
                retry_due.setdefault(path, due)
            else:
                queue(path)
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        except OSError:  # a symlink loop, a permission: the engine reports it
            if row is None or row.state not in ("failed", "blocked"):
                queue(path)
            continue
        # a derived record is looked at on every rescan: its run directory's files
        # are compared with its last translation
        if root.derived or row is None or (row.size, row.mtime_ns) != (st.st_size, st.st_mtime_ns):
            queue(path)
    # S3 run directories: the poller notices their changes; a rescan adds the idle
    # runs due to end
    for uri in poller.derived_records() if poller is not None else ():
        if recheck_due(settings.state_dir, uri, time.time()):
            queue(uri)
    for source, row in known.items():  # deleted files become "gone"
        if row.state != "gone" and source.startswith("file://"):
            gone = path_from_uri(source)
            if not gone.exists() and any(gone.is_relative_to(r.path) for r in settings.roots):
                queue(gone)
