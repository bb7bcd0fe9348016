"""Record notices from the file watcher: what matches, and lost events trigger a rescan."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import DirCreatedEvent, FileModifiedEvent, FileMovedEvent

from syncd.config import Root
from syncd.watch import RecordEventHandler, Watcher


def handler_for(
    root: Path, pattern: str = "**/run_record.jsonl"
) -> tuple[RecordEventHandler, list[Path]]:
    seen: list[Path] = []
    return RecordEventHandler(Root(path=str(root), pattern=pattern), seen.append), seen


def test_only_record_files_are_noticed(tmp_path: Path) -> None:
    handler, seen = handler_for(tmp_path)
    handler.dispatch(FileModifiedEvent(str(tmp_path / "a" / "run_record.jsonl")))
    handler.dispatch(FileModifiedEvent(str(tmp_path / "a" / "model.pt")))
    handler.dispatch(
        FileMovedEvent(str(tmp_path / "x.tmp"), str(tmp_path / "b" / "run_record.jsonl"))
    )
    assert seen == [tmp_path / "a" / "run_record.jsonl", tmp_path / "b" / "run_record.jsonl"]


def test_a_run_directory_moved_in_whole_is_scanned(tmp_path: Path) -> None:
    run = tmp_path / "team" / "run7"
    run.mkdir(parents=True)
    (run / "run_record.jsonl").write_text("")
    handler, seen = handler_for(tmp_path)
    handler.dispatch(DirCreatedEvent(str(tmp_path / "team")))
    assert seen == [run / "run_record.jsonl"]


def test_inotify_queue_overflow_asks_for_a_rescan(tmp_path: Path) -> None:
    overflowed = threading.Event()
    watcher = Watcher(
        [Root(path=str(tmp_path))],
        lambda _p: None,
        mode="auto",
        poll_interval=1,
        on_overflow=overflowed.set,
    )
    watcher.start()
    try:
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert overflowed.is_set()
    finally:
        watcher.stop()
    overflowed.clear()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
    assert not overflowed.is_set()  # a stopped watcher no longer listens
