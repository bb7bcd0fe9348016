"""Incremental reading of a record: complete lines after a checkpoint (stdlib only).

A record is read through ``read_at(offset, length) -> bytes``, so the same code
serves a local file and an object store's ranged GET. A line without its
newline is still being written and is left alone. Before continuing after a
checkpoint, the reader checks that the file still holds the consumed prefix
(size, the newline before the offset, a hash of the last consumed line, the
fingerprint of the first line);
if not, the record was replaced or truncated and must be read from the start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from syncd.errors import RecordError, UnsupportedVersion
from syncd.record.events import RUN_STARTED, Event, parse_line

ReadAt = Callable[[int, int], bytes]

MAX_LINE_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Checkpoint:
    """Where reading stopped: bytes and lines consumed, last seq seen, first-line hash."""

    offset: int = 0
    line: int = 0
    seq: int = -1
    fingerprint: str | None = None
    tail: str | None = None  # "<n>:<hash>" of the last consumed line (its last n bytes)


TAIL_BYTES = 4096


def tail_of(last_line: bytes) -> str:
    """The continuity mark of a consumed line (without its newline): its last bytes' hash."""
    window = last_line[-(TAIL_BYTES - 1) :] + b"\n"
    return f"{len(window)}:{hashlib.sha256(window).hexdigest()[:32]}"


def tail_at(read_at: ReadAt, offset: int) -> str:
    """The continuity mark of the bytes just before ``offset`` (a line too long to keep)."""
    n = min(TAIL_BYTES, offset)
    window = read_at(offset - n, n)
    return f"{len(window)}:{hashlib.sha256(window).hexdigest()[:32]}"


def fingerprint_of(first_line: bytes) -> str:
    """Hash of the first complete line: run_started holds a unique record_id."""
    return hashlib.sha256(first_line).hexdigest()[:32]


def read_first_line(read_at: ReadAt, size: int) -> bytes | None:
    """The first complete line (without newline), or None while it is incomplete."""
    buf = b""
    while len(buf) < min(size, MAX_LINE_BYTES + 1):
        chunk = read_at(len(buf), min(64 * 1024, size - len(buf)))
        if not chunk:
            return None
        cut = chunk.find(b"\n")
        if cut >= 0:
            return buf + chunk[:cut]
        buf += chunk
    return None


def replaced_reason(read_at: ReadAt, size: int, checkpoint: Checkpoint) -> str | None:
    """Why the file no longer continues the consumed prefix, or None when it does."""
    if checkpoint.offset == 0:
        return None
    if size < checkpoint.offset:
        return f"file shrank to {size} bytes, below the {checkpoint.offset} already synced"
    if read_at(checkpoint.offset - 1, 1) != b"\n":
        return f"byte {checkpoint.offset - 1} is no longer the end of a line"
    if checkpoint.tail:
        length, _, _ = checkpoint.tail.partition(":")
        n = int(length) if length.isdigit() else 0
        if 0 < n <= checkpoint.offset:
            window = read_at(checkpoint.offset - n, n)
            mark = f"{len(window)}:{hashlib.sha256(window).hexdigest()[:32]}"
            if mark != checkpoint.tail:
                return (
                    "the last synced line changed (the file was rewritten or restored from"
                    " an older copy)"
                )
    first = read_first_line(read_at, size)
    if first is None or fingerprint_of(first) != checkpoint.fingerprint:
        return "first line changed (a different record now lives at this path)"
    return None


@dataclass(slots=True)
class Lines:
    """Complete lines read from ``start``; ``end`` is the offset after the last newline.

    An entry of None stands for a line longer than MAX_LINE_BYTES (reported, skipped).
    """

    start: int
    end: int
    lines: list[bytes | None]
    reached_end: bool = True  # no complete line lies beyond ``end`` (within the size read)


def read_complete_lines(
    read_at: ReadAt, size: int, offset: int, *, chunk_bytes: int = CHUNK_BYTES
) -> Lines:
    """Complete lines starting at ``offset``, about ``chunk_bytes`` of them at most."""
    if offset >= size:
        return Lines(offset, offset, [])
    buf = read_at(offset, min(chunk_bytes, size - offset))
    cut = buf.rfind(b"\n")
    if cut >= 0:
        reached_end = offset + len(buf) >= size
        lines: list[bytes | None] = list(buf[:cut].split(b"\n"))
        return Lines(offset, offset + cut + 1, lines, reached_end)
    # No newline in a whole chunk: a line still being written, or an overlong one.
    # Scan on for its end without keeping more than MAX_LINE_BYTES of it.
    scan = offset + len(buf)
    while scan < size:
        more = read_at(scan, min(chunk_bytes, size - scan))
        if not more:
            break
        nl = more.find(b"\n")
        if nl >= 0:
            end = scan + nl + 1
            if end - offset - 1 > MAX_LINE_BYTES:
                return Lines(offset, end, [None], reached_end=False)
            return Lines(offset, end, [buf + more[:nl]], reached_end=False)
        if len(buf) <= MAX_LINE_BYTES:
            buf += more
        scan += len(more)
    return Lines(offset, offset, [])


@dataclass(slots=True)
class ParsedLines:
    """Valid events and per-line errors of a run of lines, and where to resume."""

    events: list[Event] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    lines_consumed: int = 0
    bytes_consumed: int = 0
    last_seq: int = -1
    skipped: int = 0  # bad lines at the end whose seq could not be read
    held_back: UnsupportedVersion | None = None


def parse_lines(
    lines: Lines, *, first_line: int, last_seq: int, path: str = "", skipped: int = 0
) -> ParsedLines:
    """Validate lines and their sequence; ``first_line`` is the 1-based number of the first.

    ``skipped`` counts bad lines just before these, whose seq could not be read:
    a following seq may jump by that many without being reported as a gap.
    A line of a newer format version stops parsing there: it and what follows are
    held back until syncd understands them.
    """
    out = ParsedLines(last_seq=last_seq, skipped=skipped)
    offset = lines.start
    for index, raw in enumerate(lines.lines):
        number = first_line + index
        length = (len(raw) + 1) if raw is not None else (lines.end - offset)
        try:
            if raw is None:
                raise RecordError(
                    f"line longer than {MAX_LINE_BYTES} bytes", path=path, line=number
                )
            event = _parse_line_contained(raw, number, path)
            _check_sequence(event, out.last_seq, skipped, path)
        except UnsupportedVersion as exc:
            out.held_back = exc
            return out
        except RecordError as exc:
            out.errors.append(exc)
            if not _is_repeat(exc):
                skipped += 1
        else:
            if event.seq > out.last_seq + 1 + skipped:
                out.errors.append(
                    RecordError(
                        f"seq gap: expected {out.last_seq + 1}, got {event.seq}",
                        path=path,
                        line=number,
                        seq=event.seq,
                    )
                )
            out.events.append(event)
            out.last_seq = event.seq
            skipped = 0
        out.lines_consumed += 1
        offset += length
        out.bytes_consumed = offset - lines.start
        out.skipped = skipped
    return out


def _parse_line_contained(raw: bytes, number: int, path: str) -> Event:
    """parse_line, with anything it did not foresee reported as a bad line, never raised."""
    try:
        return parse_line(raw, line=number, path=path)
    except RecordError:
        raise
    except Exception as exc:  # RecursionError, MemoryError and anything unforeseen
        raise RecordError(
            f"line could not be read: {type(exc).__name__}: {str(exc)[:200]}",
            path=path,
            line=number,
        ) from None


class _RepeatedSeq(RecordError):
    pass


def _is_repeat(exc: RecordError) -> bool:
    return isinstance(exc, _RepeatedSeq)


def _check_sequence(event: Event, last_seq: int, skipped: int, path: str) -> None:
    if event.seq <= last_seq:
        raise _RepeatedSeq(
            f"seq {event.seq} repeats (expected {last_seq + 1}); line skipped",
            path=path,
            line=event.line,
            seq=event.seq,
        )
    if event.seq == 0 and event.type != RUN_STARTED:
        raise RecordError(
            f"the first event (seq 0) must be run_started, got {event.type}",
            path=path,
            line=event.line,
            seq=0,
        )


def iter_events(data: bytes, path: str = "") -> Iterator[Event | RecordError]:
    """Every event and line error of a whole record held in memory (tests, tools)."""
    lines = read_complete_lines(
        lambda o, n: data[o : o + n], len(data), 0, chunk_bytes=len(data) + 1
    )
    parsed = parse_lines(lines, first_line=1, last_seq=-1, path=path)
    items: list[Event | RecordError] = [*parsed.events, *parsed.errors]
    items.sort(key=lambda item: item.line)
    yield from items
    if parsed.held_back is not None:
        yield parsed.held_back
