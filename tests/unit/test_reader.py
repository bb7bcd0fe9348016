"""syncd.record.reader: complete lines after a checkpoint, replacement checks, sequence rules."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.errors import RecordError, UnsupportedVersion
from syncd.record import reader
from syncd.record.events import Event
from syncd.record.reader import (
    Checkpoint,
    Lines,
    ParsedLines,
    fingerprint_of,
    iter_events,
    parse_lines,
    read_complete_lines,
    replaced_reason,
)

PATH = "runs/a/run_record.jsonl"
TS = 1_763_800_000_000


def dumps(obj: dict[str, Any]) -> bytes:
    """Serialise one event exactly as RunRecorder does."""
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def ev(seq: int, type: str = "params", v: int = 1, **fields: Any) -> bytes:
    if type == "params" and not fields:
        fields = {"params": {f"p{seq}": seq}}
    return dumps({"v": v, "seq": seq, "ts": TS + seq, "type": type, **fields})


def started(record_id: str = "rec0001") -> bytes:
    return ev(0, "run_started", record_id=record_id, experiment="exp")


def read_at_of(data: bytes):  # type: ignore[no-untyped-def]
    return lambda offset, length: data[offset : offset + length]


def lines_of(data: bytes, offset: int = 0, chunk_bytes: int = reader.CHUNK_BYTES) -> Lines:
    return read_complete_lines(read_at_of(data), len(data), offset, chunk_bytes=chunk_bytes)


def parse_all(data: bytes) -> ParsedLines:
    return parse_lines(lines_of(data), first_line=1, last_seq=-1, path=PATH)


@dataclass
class Tail:
    """What a tailer keeps between reads, and everything it has read so far."""

    offset: int = 0
    line: int = 0
    last_seq: int = -1
    skipped: int = 0
    events: list[Event] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    held_back: UnsupportedVersion | None = None

    def catch_up(self, read_at: Any, size: int, chunk_bytes: int = reader.CHUNK_BYTES) -> None:
        while True:
            lines = read_complete_lines(read_at, size, self.offset, chunk_bytes=chunk_bytes)
            if not lines.lines:
                assert lines.end == lines.start == self.offset
                return
            assert lines.start == self.offset
            parsed = parse_lines(
                lines,
                first_line=self.line + 1,
                last_seq=self.last_seq,
                path=PATH,
                skipped=self.skipped,
            )
            self.events += parsed.events
            self.errors += parsed.errors
            self.offset += parsed.bytes_consumed
            self.line += parsed.lines_consumed
            self.last_seq = parsed.last_seq
            self.skipped = parsed.skipped
            if parsed.held_back is not None:
                self.held_back = parsed.held_back
                return
            if parsed.lines_consumed == 0:
                return


# -- read_complete_lines --------------------------------------------------------------------


def test_partial_last_line_is_left_alone() -> None:
    complete = started() + ev(1)
    partial = b'{"v":1,"seq":2,"ts":1,"type":"par'
    data = complete + partial
    lines = lines_of(data)
    assert lines.start == 0
    assert lines.end == len(complete)
    assert lines.lines == [started().rstrip(b"\n"), ev(1).rstrip(b"\n")]
    again = lines_of(data, offset=lines.end)
    assert again.lines == []
    assert again.end == again.start == len(complete)


def test_partial_line_is_read_once_its_newline_arrives() -> None:
    complete = started()
    partial = ev(1)[:-5]
    assert lines_of(complete + partial, offset=len(complete)).lines == []
    finished = lines_of(complete + ev(1), offset=len(complete))
    assert finished.lines == [ev(1).rstrip(b"\n")]
    assert finished.end == len(complete + ev(1))


def test_offset_at_or_past_the_end_reads_nothing() -> None:
    data = started()
    assert lines_of(data, offset=len(data)) == Lines(len(data), len(data), [])


def test_lines_at_chunk_boundaries_are_read_whole_for_every_chunk_size() -> None:
    raw_lines = [started(), ev(1), ev(2, "tags", tags={"a": "b"}), ev(3), b"{}\n", ev(4)]
    data = b"".join(raw_lines)
    expected = [line.rstrip(b"\n") for line in raw_lines]
    for chunk_bytes in range(1, len(data) + 2):
        offset, got = 0, []
        while True:
            lines = lines_of(data, offset=offset, chunk_bytes=chunk_bytes)
            if not lines.lines:
                break
            assert lines.start == offset
            assert data[lines.end - 1 : lines.end] == b"\n"
            assert all(line is not None for line in lines.lines)
            got += lines.lines
            offset = lines.end
        assert got == expected, f"chunk_bytes={chunk_bytes}"
        assert offset == len(data)


def test_chunk_ending_exactly_on_a_newline_returns_that_line() -> None:
    first = started()
    data = first + ev(1)
    lines = lines_of(data, chunk_bytes=len(first))
    assert lines.lines == [first.rstrip(b"\n")]
    assert lines.end == len(first)
    assert lines.reached_end is False


def test_chunk_ending_one_byte_before_a_newline_still_returns_that_line() -> None:
    first = started()
    data = first + ev(1)
    lines = lines_of(data, chunk_bytes=len(first) - 1)
    assert lines.lines == [first.rstrip(b"\n")]
    assert lines.end == len(first)


def test_reached_end_when_the_chunk_covers_the_file() -> None:
    data = started() + ev(1)
    assert lines_of(data).reached_end is True


def test_overlong_line_is_reported_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 100)
    # 120 bytes: over the limit, its newline inside the chunk read as the scan crosses it
    overlong = b'{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"a":"' + b"x" * 68 + b'"}}\n'
    data = started("r1") + overlong + ev(2) + ev(3)
    assert len(overlong) - 1 == 120

    lines = lines_of(data, offset=len(started("r1")), chunk_bytes=64)
    assert lines.lines == [None]
    assert lines.end == len(started("r1")) + len(overlong)

    tail = Tail()
    tail.catch_up(read_at_of(data), len(data), chunk_bytes=64)
    assert [e.seq for e in tail.events] == [0, 2, 3]
    assert len(tail.errors) == 1
    err = tail.errors[0]
    assert "longer than 100 bytes" in err.reason
    assert err.line == 2
    assert f"{PATH}:2" in str(err)
    assert tail.offset == len(data)
    assert tail.line == 4


def test_unterminated_overlong_line_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 100)
    data = started() + b"y" * 150
    lines = lines_of(data, offset=len(started()), chunk_bytes=64)
    assert lines.lines == []
    assert lines.end == len(started())


def test_very_overlong_terminated_line_is_reported_and_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 100)
    overlong = b"z" * 1000 + b"\n"
    data = started() + overlong + ev(2)
    lines = lines_of(data, offset=len(started()), chunk_bytes=64)
    assert lines.lines == [None]
    assert lines.end == len(started()) + len(overlong)


# -- replaced_reason ------------------------------------------------------------------------


def checkpoint_after(data: bytes, offset: int) -> Checkpoint:
    first = data[: data.index(b"\n")]
    return Checkpoint(offset=offset, line=1, seq=0, fingerprint=fingerprint_of(first))


def test_untouched_file_is_not_replaced() -> None:
    data = started() + ev(1) + ev(2)
    cp = checkpoint_after(data, len(started() + ev(1)))
    assert replaced_reason(read_at_of(data), len(data), cp) is None
    grown = data + ev(3)
    assert replaced_reason(read_at_of(grown), len(grown), cp) is None


def test_fresh_checkpoint_is_never_replaced() -> None:
    assert replaced_reason(read_at_of(b""), 0, Checkpoint()) is None
    assert replaced_reason(read_at_of(b"junk"), 4, Checkpoint()) is None


def test_file_truncated_below_offset_is_replaced() -> None:
    data = started() + ev(1) + ev(2)
    cp = checkpoint_after(data, len(data))
    shorter = data[: len(started())]
    reason = replaced_reason(read_at_of(shorter), len(shorter), cp)
    assert reason is not None
    assert "shrank" in reason


def test_byte_before_offset_not_a_newline_is_replaced() -> None:
    data = started() + ev(1) + ev(2)
    cp = checkpoint_after(data, len(started() + ev(1)))
    rewritten = started() + ev(1, params={"a_much_longer_param_name": "value"}) + ev(2)
    assert rewritten[cp.offset - 1 : cp.offset] != b"\n"
    reason = replaced_reason(read_at_of(rewritten), len(rewritten), cp)
    assert reason is not None
    assert f"byte {cp.offset - 1}" in reason


def test_first_line_changed_is_replaced() -> None:
    data = started("recAAAA") + ev(1)
    cp = checkpoint_after(data, len(data))
    other = started("recBBBB") + ev(1)
    assert len(other) == len(data)
    reason = replaced_reason(read_at_of(other), len(other), cp)
    assert reason is not None
    assert "first line changed" in reason


# -- parse_lines ----------------------------------------------------------------------------


def test_clean_record_parses_without_errors() -> None:
    data = (
        started()
        + ev(1)
        + ev(2, "metrics", metrics={"loss": 1.0})
        + ev(3, "run_finished", status="FINISHED")
    )
    parsed = parse_all(data)
    assert parsed.errors == []
    assert [(e.seq, e.line, e.type) for e in parsed.events] == [
        (0, 1, "run_started"),
        (1, 2, "params"),
        (2, 3, "metrics"),
        (3, 4, "run_finished"),
    ]
    assert parsed.lines_consumed == 4
    assert parsed.bytes_consumed == len(data)
    assert parsed.last_seq == 3
    assert parsed.held_back is None


def test_seq_gap_is_reported_but_event_kept() -> None:
    data = started() + ev(1) + ev(3) + ev(4)
    parsed = parse_all(data)
    assert [e.seq for e in parsed.events] == [0, 1, 3, 4]
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert "seq gap" in err.reason
    assert "expected 2" in err.reason
    assert (err.line, err.seq) == (3, 3)
    assert f"{PATH}:3" in str(err)
    assert parsed.last_seq == 4


def test_repeated_seq_is_reported_and_line_skipped() -> None:
    data = started() + ev(1) + ev(1, params={"other": 1}) + ev(2)
    parsed = parse_all(data)
    assert [(e.seq, e.line) for e in parsed.events] == [(0, 1), (1, 2), (2, 4)]
    assert parsed.events[1].fields == {"params": {"p1": "1"}}
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert "repeats" in err.reason
    assert (err.line, err.seq) == (3, 1)
    assert parsed.lines_consumed == 4
    assert parsed.bytes_consumed == len(data)


def test_next_seq_after_invalid_json_is_not_a_gap() -> None:
    data = started() + ev(1) + b'{"v":1,"seq":2,"ts\n' + ev(3)
    parsed = parse_all(data)
    assert [e.seq for e in parsed.events] == [0, 1, 3]
    assert len(parsed.errors) == 1
    assert "invalid JSON" in parsed.errors[0].reason
    assert parsed.errors[0].line == 3
    assert parsed.skipped == 0


def test_skipped_count_carries_over_between_reads() -> None:
    head = started() + ev(1) + b"garbage\n"
    first = parse_lines(lines_of(head), first_line=1, last_seq=-1, path=PATH)
    assert first.skipped == 1
    assert first.last_seq == 1
    assert len(first.errors) == 1
    data = head + ev(3)
    second = parse_lines(
        lines_of(data, offset=len(head)),
        first_line=4,
        last_seq=first.last_seq,
        path=PATH,
        skipped=first.skipped,
    )
    assert [e.seq for e in second.events] == [3]
    assert second.errors == []
    assert second.skipped == 0


def test_gap_larger_than_the_skipped_lines_is_still_reported() -> None:
    data = started() + b"garbage\n" + ev(5)
    parsed = parse_all(data)
    assert [e.seq for e in parsed.events] == [0, 5]
    reasons = [e.reason for e in parsed.errors]
    assert len(reasons) == 2
    assert "invalid JSON" in reasons[0]
    assert "seq gap" in reasons[1]


def test_newer_version_holds_back_it_and_everything_after() -> None:
    before = started() + ev(1)
    data = before + ev(2, v=2) + ev(3)
    parsed = parse_all(data)
    assert [e.seq for e in parsed.events] == [0, 1]
    assert isinstance(parsed.held_back, UnsupportedVersion)
    assert parsed.held_back.line == 3
    assert "unsupported version" in str(parsed.held_back)
    assert parsed.lines_consumed == 2
    assert parsed.bytes_consumed == len(before)
    assert parsed.last_seq == 1
    assert parsed.errors == []


def test_seq_zero_that_is_not_run_started_is_an_error() -> None:
    data = ev(0, "metrics", metrics={"loss": 1.0}) + ev(1)
    parsed = parse_all(data)
    assert [e.seq for e in parsed.events] == [1]
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert "run_started" in err.reason
    assert (err.line, err.seq) == (1, 0)


def test_iter_events_yields_events_and_errors_in_line_order() -> None:
    data = started() + b"[]\n" + ev(2) + ev(2) + ev(3, v=9)
    items = list(iter_events(data, path=PATH))
    kinds = [(type(i).__name__, i.line) for i in items]
    assert kinds == [
        ("Event", 1),
        ("RecordError", 2),
        ("Event", 3),
        ("_RepeatedSeq", 4),
        ("UnsupportedVersion", 5),
    ]


# -- property: incremental reading equals reading the whole file ----------------------------

keys = st.text(alphabet="abcdefghij_./:- é", min_size=1, max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False)
param_values = st.one_of(
    st.text(max_size=30), st.integers(-(10**12), 10**12), finite, st.booleans()
)
metric_values = st.one_of(
    finite, st.integers(-(10**9), 10**9), st.sampled_from(["NaN", "Infinity", "-Infinity"])
)
body = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("params"), "params": st.dictionaries(keys, param_values, max_size=5)}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("metrics"),
            "step": st.integers(0, 10**6),
            "metrics": st.dictionaries(keys, metric_values, max_size=5),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("tags"), "tags": st.dictionaries(keys, st.text(max_size=30), max_size=5)}
    ),
)


def serialise(bodies: list[dict[str, Any]]) -> bytes:
    out = [
        dumps(
            {
                "v": 1,
                "seq": 0,
                "ts": TS,
                "type": "run_started",
                "record_id": "r1",
                "experiment": "e",
            }
        )
    ]
    for seq, b in enumerate(bodies, start=1):
        out.append(dumps({"v": 1, "seq": seq, "ts": TS + seq, **b}))
    return b"".join(out)


def summary(events: list[Event]) -> list[tuple[int, str, int, str, list[str]]]:
    # repr keeps NaN comparable (nan != nan, but 'nan' == 'nan').
    return [(e.seq, e.type, e.line, repr(e.fields), e.problems) for e in events]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(body, max_size=40),
    data=st.data(),
    chunk_bytes=st.one_of(st.integers(1, 300), st.just(reader.CHUNK_BYTES)),
)
def test_incremental_reads_of_appends_equal_one_whole_read(
    bodies: list[dict[str, Any]], data: st.DataObject, chunk_bytes: int
) -> None:
    record = serialise(bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(record)), max_size=12), label="cuts"))
    pieces = [record[a:b] for a, b in zip([0, *cuts], [*cuts, len(record)], strict=True)]

    whole = list(iter_events(record, path=PATH))
    assert all(isinstance(item, Event) for item in whole)
    assert len(whole) == len(bodies) + 1

    tail = Tail()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run_record.jsonl"
        path.touch()
        fd = os.open(path, os.O_RDONLY)
        try:
            written = b""
            for piece in pieces:
                with path.open("ab") as f:
                    f.write(piece)
                written += piece
                size = os.fstat(fd).st_size
                assert size == len(written)
                tail.catch_up(lambda o, n: os.pread(fd, n, o), size, chunk_bytes)
                # the tailer always stops right after the last complete line
                assert tail.offset == written.rfind(b"\n") + 1
                assert tail.line == written.count(b"\n")
        finally:
            os.close(fd)

    assert tail.errors == []
    assert tail.held_back is None
    assert tail.skipped == 0
    assert tail.offset == len(record)
    assert tail.last_seq == len(bodies)
    assert summary(tail.events) == summary(whole)  # type: ignore[arg-type]
