"""``syncd verify``: compare each run record with its MLflow run, writing nothing.

Three parts, kept apart:

- the **expected** state of a record (:mod:`syncd.verify.expected`), built
  with the reader and projection syncd itself uses (``read_complete_lines`` ->
  ``parse_lines`` -> ``plan_writes``, in bounded chunks), so verify expects
  exactly what a backfill writes: names MLflow refuses are not expected, long
  params are truncated, a param keeps its first value, a blocked record is
  expected up to the held-back line;
- the **found** state, read through ``MlflowClient`` (:class:`MlflowView`) and
  the ledger opened read-only (:class:`LedgerView`), in :mod:`syncd.verify.views`;
- :func:`compare`, pure: expected and found in, differences out
  (:mod:`syncd.verify.compare`).

Memory stays flat whatever the number of records: records are read one at a
time, a metric is summarised (points, last point) instead of kept, and the
record_id -> run index holds only ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from syncd.config import Root, Settings
from syncd.errors import ConfigError
from syncd.logging import redact_text
from syncd.record.reader import Checkpoint, replaced_reason
from syncd.snapshot.derived import DerivedRecord, LocalRunDir
from syncd.sources.local import LocalRecord
from syncd.sources.s3 import S3Record
from syncd.verify.compare import (
    Difference,
    Found,
    RunRef,
    compare,
    compare_index,
    compare_progress,
    pick_run,
)
from syncd.verify.expected import (
    ArtifactSizes,
    Expected,
    MetricSummary,
    artifact_files,
    read_expected,
)
from syncd.verify.views import LedgerView, MlflowView

SourceRecord = LocalRecord | S3Record | DerivedRecord

__all__ = [
    "Difference",
    "Expected",
    "Found",
    "LedgerView",
    "MetricSummary",
    "MlflowView",
    "RecordResult",
    "RunRef",
    "VerifyTotals",
    "compare",
    "read_expected",
    "verify_records",
]


@dataclass(slots=True)
class RecordResult:
    file: str
    record_id: str | None
    run_id: str | None
    differences: list[Difference]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "record_id": self.record_id,
            "run_id": self.run_id,
            "differences": [d.as_dict() for d in self.differences],
        }


@dataclass(slots=True)
class VerifyTotals:
    tracking_uri: str
    ledger: str | None
    records: int = 0
    clean: int = 0
    with_differences: int = 0
    differences: int = 0
    not_projected: int = 0  # records without a valid run_started (nothing expected)
    duration_s: float = 0.0

    def add(self, result: RecordResult) -> None:
        self.records += 1
        if result.differences:
            self.with_differences += 1
            self.differences += len(result.differences)
        else:
            self.clean += 1
        if result.record_id is None:
            self.not_projected += 1

    @property
    def ok(self) -> bool:
        return self.differences == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "ledger": self.ledger,
            "records": self.records,
            "clean": self.clean,
            "with_differences": self.with_differences,
            "differences": self.differences,
            "not_projected": self.not_projected,
            "duration_s": self.duration_s,
        }

    def line(self) -> str:
        verdict = "mirror complete" if self.ok else "mirror differs"
        return (
            f"{verdict}: {self.records} records verified, {self.clean} clean,"
            f" {self.with_differences} with {self.differences} differences"
            f" ({self.duration_s:.1f}s) against {self.tracking_uri}"
        )


def check_roots(roots: Iterable[Root]) -> list[Root]:
    """The roots, each checked to exist (ConfigError otherwise) before anything is read."""
    checked = list(roots)
    if not checked:
        raise ConfigError("no roots: give ROOT arguments or 'roots' in the config file")
    for root in checked:
        if not root.is_s3 and not Path(root.path).exists():
            raise ConfigError(f"root {root.path} does not exist")
    return checked


def verify_records(settings: Settings) -> tuple[VerifyTotals, Iterator[RecordResult]]:
    """Check the roots and open MLflow and the ledger, then verify record by record.

    Usage errors (a missing root, no store) raise here, before any result; the
    iterator yields one result per record and fills ``totals`` as it goes.
    """
    from syncd.backfill import sink_key

    roots = check_roots(settings.roots)
    sink = sink_key(settings.tracking_uri)
    view = MlflowView(settings.tracking_uri)
    ledger = LedgerView.open(settings, sink)
    totals = VerifyTotals(tracking_uri=sink, ledger=redact_text(ledger.url) if ledger else None)
    return totals, _results(roots, view, ledger, totals, settings.timeouts.http, settings.state_dir)


def _results(
    roots: list[Root],
    view: MlflowView,
    ledger: LedgerView | None,
    totals: VerifyTotals,
    timeout: float,
    state_dir: Path | None = None,
) -> Iterator[RecordResult]:
    from syncd.backfill import iter_records

    started = time.perf_counter()

    def records() -> Iterator[tuple[Root, SourceRecord]]:
        # A snapshot root's records are what syncd derived so far (read, not derived anew).
        return iter_records(roots, timeout=timeout, state_dir=state_dir, read_only=True)

    def counted(result: RecordResult) -> RecordResult:
        totals.add(result)
        totals.duration_s = round(time.perf_counter() - started, 3)
        return result

    try:
        index = view.index()
        # Records continuing a run by mlflow_run_id (their first line tells) are compared
        # together with the record that created the run, when it is under the roots.
        continuing: dict[str, list[tuple[Root, SourceRecord]]] = {}
        resumers: set[str] = set()
        for root, record in records():
            run_id = continued_run(record)
            if run_id is not None:
                continuing.setdefault(run_id, []).append((root, record))
                resumers.add(record.uri)
            else:
                record.close()
        folded: set[str] = set()
        for root, record in records():
            if record.uri in resumers:
                record.close()
                continue
            for result in verify_one(
                record, root.experiment, view, index, ledger, continued_by=continuing
            ):
                if result.file != record.display:
                    folded.add(result.file)
                yield counted(result)
        for group in continuing.values():
            for root, record in group:
                if record.display not in folded:
                    for result in verify_one(record, root.experiment, view, index, ledger):
                        yield counted(result)
    finally:
        if ledger is not None:
            ledger.close()
    totals.duration_s = round(time.perf_counter() - started, 3)


def continued_run(record: SourceRecord) -> str | None:
    """The ``mlflow_run_id`` of the record's first line (``run_started``), if any."""
    try:
        head = record.read_at(0, 65536)
    except OSError:
        return None
    finally:
        record.close()
    first = head.split(b"\n", 1)[0]
    try:
        obj = json.loads(first)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "run_started":
        return None
    run_id = obj.get("mlflow_run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def _expected_of(
    record: SourceRecord, default_experiment: str | None, ledger: LedgerView | None
) -> tuple[Expected | None, list[Difference]]:
    """The record's expected state and its progress differences (None: nothing to
    expect, the differences say why)."""
    progress: list[Difference] = []
    try:
        try:
            sizes: ArtifactSizes | None = None
            if isinstance(record, LocalRecord):
                sizes = partial(artifact_files, record.run_dir)
            elif isinstance(record, S3Record):  # a HEAD per file artifact, a listing per folder
                sizes = record.artifact_sizes
            elif isinstance(record, DerivedRecord) and isinstance(record.run_dir, LocalRunDir):
                sizes = partial(artifact_files, record.run_dir.path)
            expected = read_expected(
                record, default_experiment=default_experiment, artifact_sizes=sizes
            )
        except FileNotFoundError:
            return None, []  # gone since it was found
        except OSError as exc:
            return None, [Difference("unreadable", "record file", "readable", str(exc))]
        if ledger is not None:
            row = ledger.record(record.uri)
            reason = None
            if row is not None:
                checkpoint = Checkpoint(row.offset, row.line, row.seq, row.fingerprint)
                reason = replaced_reason(record.read_at, expected.size, checkpoint)
            progress = compare_progress(expected, row, reason)
    finally:
        record.close()
    return expected, progress


def verify_one(
    record: SourceRecord,
    default_experiment: str | None,
    view: MlflowView,
    index: dict[str, list[RunRef]],
    ledger: LedgerView | None,
    *,
    continued_by: dict[str, list[tuple[Root, SourceRecord]]] | None = None,
) -> list[RecordResult]:
    """Expected vs found for one record (its history is summarised, then dropped).

    A record that continues another's run (``mlflow_run_id``) is compared with that
    run, found by its id, for what it writes. The records of ``continued_by`` that
    continue this record's run are folded into what it expects (in the order they
    started) and the run is compared once: their results follow, with their own
    progress only.
    """
    expected, progress = _expected_of(record, default_experiment, ledger)
    if expected is None or expected.record_id is None:
        # unreadable, gone, or no valid run_started: a sync projects nothing of it
        rid = expected.record_id if expected is not None else None
        return [RecordResult(record.display, rid, None, progress)]
    rid = expected.record_id
    if expected.mlflow_run_id is not None:
        run_id = expected.mlflow_run_id
        if not view.exists(run_id):
            missing = Difference("run_missing", "run", f"run {run_id} (mlflow_run_id)", "none")
            return [RecordResult(record.display, rid, None, [missing, *progress])]
        found = view.fetch(run_id, expected)
        diffs = compare(expected, found, parent_run_id=None, parent_known=False)
        return [RecordResult(record.display, rid, run_id, [*diffs, *progress])]
    refs = index.get(rid, [])
    ledger_run = ledger.run_id(rid) if ledger is not None else None
    diffs = compare_index(expected, refs, ledger_run)
    if not refs:
        return [RecordResult(record.display, rid, None, [*diffs, *progress])]
    chosen = pick_run(refs, ledger_run)
    later: list[RecordResult] = []
    folded: list[tuple[int, str, Expected, RecordResult]] = []
    for root, other in (continued_by or {}).get(chosen.run_id, []):
        more, more_progress = _expected_of(other, root.experiment, ledger)
        result = RecordResult(other.display, None, chosen.run_id, more_progress)
        if more is not None:
            result.record_id = more.record_id
            folded.append((more.begun or 0, other.display, more, result))
        else:
            later.append(result)
    for _start, _display, more, result in sorted(folded, key=lambda t: (t[0], t[1])):
        expected.absorb(more)
        later.append(result)
    found = view.fetch(chosen.run_id, expected)
    parent_run_id: str | None = None
    parent_known = False
    if expected.parent_record_id is not None:
        parents = index.get(expected.parent_record_id, [])
        if parents:
            parent_known = True
            parent_ledger = ledger.run_id(expected.parent_record_id) if ledger else None
            parent_run_id = pick_run(parents, parent_ledger).run_id
    diffs += compare(expected, found, parent_run_id=parent_run_id, parent_known=parent_known)
    return [RecordResult(record.display, rid, chosen.run_id, [*diffs, *progress]), *later]
