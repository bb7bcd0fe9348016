"""Fuzzing the reader and the engine with hypothesis: arbitrary bytes, arbitrary partial writes.

A record grows in arbitrary chunks (a writer's partial writes) and is synced after
each. Whatever the bytes: nothing raises, no line is read twice, no complete valid
line is skipped, and the result is the one a single read of the whole file gives.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.artifacts import ResolvedArtifact
from syncd.engine import Engine
from syncd.errors import RecordError
from syncd.ledger import Ledger
from syncd.projection import RunSpec, WritePlan
from syncd.record.events import Event, parse_line
from syncd.record.reader import parse_lines, read_complete_lines
from syncd.sink import ApplyResult

FUZZ = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = 1_763_800_000_000


def event_line(seq: int, kind: str) -> bytes:
    obj: dict[str, Any] = {"v": 1, "seq": seq, "ts": T0 + seq, "type": kind}
    if kind == "run_started":
        obj.update(record_id="fuzz", experiment="exp")
    elif kind == "metrics":
        obj.update(metrics={f"m{seq}": float(seq)}, step=seq)
    elif kind == "tags":
        obj.update(tags={"t": str(seq)})
    return json.dumps(obj).encode() + b"\n"


garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n")
gap = st.integers(min_value=1, max_value=3)


@st.composite
def records(draw: st.DrawFn, *, garbage_lines: bool = True) -> bytes:
    """run_started, then valid events (seq rising, sometimes with a gap) and bad lines."""
    out = [event_line(0, "run_started")]
    seq = 0
    for _ in range(draw(st.integers(0, 12))):
        if garbage_lines and draw(st.booleans()) and draw(st.booleans()):
            out.append(draw(garbage))
            continue
        seq += draw(gap) if draw(st.integers(0, 5)) == 0 else 1
        out.append(event_line(seq, draw(st.sampled_from(["metrics", "tags", "x-note"]))))
    tail = draw(st.binary(max_size=30))  # a last line still being written, or not
    return b"".join(out) + tail


def split_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [*sorted(cuts), len(data)]
    )


@dataclass
class Reading:
    events: list[Event] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    offset: int = 0
    line: int = 0
    seq: int = -1
    skipped: int = 0
    held: bool = False

    def key(self) -> tuple[Any, ...]:
        return (
            [(e.line, e.seq, e.type, e.fields, e.problems) for e in self.events],
            sorted((e.line, e.reason) for e in self.errors),
            self.offset,
            self.line,
            self.held,
        )


def sync(reading: Reading, data: bytes, size: int, chunk_bytes: int) -> None:
    """What the engine does with one record: read on from the checkpoint until nothing is left."""
    while not reading.held:
        lines = read_complete_lines(
            lambda o, n: data[o : min(o + n, size)], size, reading.offset, chunk_bytes=chunk_bytes
        )
        if not lines.lines:
            return
        parsed = parse_lines(
            lines,
            first_line=reading.line + 1,
            last_seq=reading.seq,
            skipped=reading.skipped,
        )
        reading.events += parsed.events
        reading.errors += parsed.errors
        reading.offset += parsed.bytes_consumed
        reading.line += parsed.lines_consumed
        reading.seq = parsed.last_seq
        reading.skipped = parsed.skipped
        if parsed.held_back is not None:
            reading.held = True
        if parsed.lines_consumed == 0:
            return


def whole(data: bytes) -> Reading:
    reading = Reading()
    sync(reading, data, len(data), chunk_bytes=len(data) + 1)
    return reading


def check_growing(data: bytes, cuts: list[int], chunk_bytes: int) -> None:
    reading = Reading()
    for size in cuts:
        sync(reading, data, size, chunk_bytes)
    lines = [e.line for e in reading.events] + [e.line for e in reading.errors]
    assert len({e.line for e in reading.events}) == len(reading.events)  # no line read twice
    assert reading.offset == data.rfind(b"\n") + 1 or reading.held
    assert reading.key() == whole(data).key()
    assert all(1 <= n <= reading.line for n in lines)


@FUZZ
@given(st.data(), st.binary(max_size=400), st.integers(1, 64))
def test_arbitrary_bytes_growing_in_arbitrary_chunks(
    data: st.DataObject, raw: bytes, chunk_bytes: int
) -> None:
    check_growing(raw, data.draw(split_points(raw)), chunk_bytes)


@FUZZ
@given(st.data(), records(), st.integers(1, 200))
def test_records_growing_in_arbitrary_chunks(
    data: st.DataObject, record: bytes, chunk_bytes: int
) -> None:
    cuts = data.draw(split_points(record))
    check_growing(record, cuts, chunk_bytes)
    # every complete line that is valid on its own is an event (the generator never
    # repeats a seq), and each shows up exactly once
    result = whole(record)
    valid = []
    for number, raw in enumerate(record.split(b"\n")[:-1], start=1):
        try:
            parse_line(raw, line=number)
        except RecordError:
            continue
        valid.append(number)
    assert [e.line for e in result.events] == valid


# -- the engine over an in-memory sink and ledger -------------------------------------


class FakeSink:
    """The Sink protocol in memory: remembers every metric point it was given."""

    def __init__(self) -> None:
        self.points: list[tuple[int, str]] = []  # (line, key)
        self.tags: dict[str, str] = {}
        self.runs = 0

    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult:
        self.runs += 1
        return ApplyResult(run_id=f"run-{self.runs}", experiment_id="0", created=True)

    def apply(
        self,
        plan: WritePlan,
        *,
        run: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
        model_files: Mapping[str, ResolvedArtifact] | None = None,
    ) -> ApplyResult:
        for batch in plan.batches:
            self.points += [(p.line, p.key) for p in batch.metrics]
            self.tags.update((t.key, t.value) for t in batch.tags)
        return ApplyResult(run_id=run.run_id, experiment_id=run.experiment_id, created=False)

    def link_parent(self, run_id: str, parent_run_id: str) -> None:
        pass


class GrowingRecord:
    """A RecordFile over bytes that a writer appends to; mtime moves on each write."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = 0
        self.mtime = 0

    @property
    def uri(self) -> str:
        return "mem://fuzz/run_record.jsonl"

    @property
    def display(self) -> str:
        return "fuzz/run_record.jsonl"

    def grow_to(self, size: int) -> None:
        self.size = size
        self.mtime += 1

    def stat(self) -> tuple[int, int]:
        return self.size, self.mtime

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : min(offset + length, self.size)]

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        raise AssertionError("no artifacts in this fuzz")


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), records(), st.sampled_from([None, 7, 64]))
def test_engine_applies_each_complete_valid_line_once(
    data: st.DataObject, record: bytes, chunk: int | None
) -> None:
    import syncd.engine as engine_module

    cuts = data.draw(split_points(record))
    sink = FakeSink()
    ledger = Ledger("sqlite://", "fake")
    source = GrowingRecord(record)
    engine = Engine(ledger, sink)
    original = engine_module.read_complete_lines
    if chunk is not None:  # small reads: lines cross chunk boundaries
        engine_module.read_complete_lines = lambda r, s, o, **_k: original(
            r, s, o, chunk_bytes=chunk
        )  # type: ignore[assignment]
    try:
        for size in cuts:
            source.grow_to(size)
            engine.sync(source)  # never raises
        engine.sync(source)  # unchanged: nothing more
        row = ledger.get_record(source.uri)
    finally:
        engine_module.read_complete_lines = original  # type: ignore[assignment]
        ledger.close()
    expected = whole(record)
    metric_lines = [e.line for e in expected.events if e.type == "metrics"]
    assert Counter(line for line, _ in sink.points) == Counter(metric_lines)
    tag_events = [e for e in expected.events if e.type == "tags"]
    assert sink.tags == ({"t": tag_events[-1].fields["tags"]["t"]} if tag_events else {})
    assert sink.runs == 1
    assert row is not None and row.offset == expected.offset  # every complete line consumed
