"""Expected and found in, differences out: pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncd.logging import redact_text
from syncd.projection import (
    PARENT_RUN_TAG,
    RECORD_ID_TAG,
)
from syncd.verify.expected import Expected, MetricSummary, describe_point, same_point

MLFLOW_TAG_PREFIX = "mlflow."
MODEL_ID_TAG = "syncd.model_id"  # the mirrored LoggedModel's link to the record's model


@dataclass(frozen=True, slots=True)
class RunRef:
    """One run carrying a ``syncd.record_id`` tag: ids only (the index of a whole store)."""

    run_id: str
    experiment_id: str
    start_time: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class FoundModel:
    """The mirrored LoggedModel of one record model, and its registration."""

    model_id: str  # MLflow's id of the LoggedModel
    status: str
    source_run_id: str | None
    versions: tuple[str, ...] = ()  # versions of the expected registered model holding it
    alias_version: str | None = None  # the version the expected alias points at


@dataclass(slots=True)
class Found:
    """What MLflow holds for one run."""

    run_id: str
    experiment_name: str | None
    experiment_deleted: bool
    deleted: bool
    status: str
    start_time: int | None
    end_time: int | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, MetricSummary]
    artifacts: dict[str, int | None]  # artifact file -> size; only the folders asked for
    datasets: set[tuple[str, str]]
    models: dict[str, FoundModel] = field(default_factory=dict)  # by the record's model id


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    offset: int
    line: int
    seq: int
    fingerprint: str | None
    state: str


@dataclass(frozen=True, slots=True)
class Difference:
    """One way MLflow differs from a record."""

    kind: str  # see docs/cli-json.md
    what: str
    expected: str
    found: str
    key: str | None = None

    def text(self, file: str) -> str:
        """``file: what differs (expected X, found Y)``, secrets in URIs removed."""
        return redact_text(f"{file}: {self.what} (expected {self.expected}, found {self.found})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "what": redact_text(self.what),
            "expected": redact_text(self.expected),
            "found": redact_text(self.found),
        }


# -- comparison (pure) -------------------------------------------------------------------


def _q(value: str | None, limit: int = 120) -> str:
    if value is None:
        return "none"
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _ms(value: int | None) -> str:
    return "none" if value is None else str(value)


def pick_run(refs: list[RunRef], ledger_run_id: str | None) -> RunRef:
    """The run to compare with among several: the ledger's, else the one adopted first."""
    for ref in refs:
        if ref.run_id == ledger_run_id:
            return ref
    return min(refs, key=lambda r: (r.start_time, r.run_id))


def compare_index(
    expected: Expected, refs: list[RunRef], ledger_run_id: str | None
) -> list[Difference]:
    """Run missing, duplicated, or not the one the ledger maps the record to."""
    rid = expected.record_id
    if not refs:
        return [
            Difference(
                "run_missing",
                "run",
                f"a run tagged {RECORD_ID_TAG}={rid}",
                "none",
            )
        ]
    diffs: list[Difference] = []
    if len(refs) > 1:
        ids = ", ".join(r.run_id for r in sorted(refs, key=lambda r: (r.start_time, r.run_id)))
        diffs.append(
            Difference(
                "run_duplicated",
                f"runs tagged {RECORD_ID_TAG}={rid}",
                "1",
                f"{len(refs)} ({ids})",
            )
        )
    if ledger_run_id is not None and all(r.run_id != ledger_run_id for r in refs):
        diffs.append(
            Difference(
                "ledger_run",
                "run of the ledger's record -> run map",
                ledger_run_id,
                ", ".join(r.run_id for r in refs),
            )
        )
    return diffs


def compare(
    expected: Expected, found: Found, *, parent_run_id: str | None, parent_known: bool
) -> list[Difference]:
    """Every difference between a record's expected state and its run (pure).

    ``parent_run_id`` is the run of the record's parent record (None when the
    record has no parent or the parent has no run: ``parent_known`` tells which).
    """
    diffs: list[Difference] = []
    add = diffs.append
    if found.deleted:
        add(Difference("run_deleted", f"run {found.run_id}", "active", "deleted"))
    if expected.experiment is not None and found.experiment_name != expected.experiment:
        add(
            Difference(
                "experiment", "experiment", _q(expected.experiment), _q(found.experiment_name)
            )
        )
    elif found.experiment_deleted:
        add(
            Difference("experiment", f"experiment {_q(found.experiment_name)}", "active", "deleted")
        )
    # a record continuing a run created elsewhere: only what it writes is compared
    partial = expected.partial
    if expected.status is not None and found.status != expected.status:
        add(Difference("status", "status", expected.status, found.status))
    if expected.start_time is not None and found.start_time != expected.start_time:
        add(Difference("start_time", "start time", _ms(expected.start_time), _ms(found.start_time)))
    if (not partial or expected.status_set) and found.end_time != expected.end_time:
        add(Difference("end_time", "end time", _ms(expected.end_time), _ms(found.end_time)))

    for key, value in expected.params.items():
        got = found.params.get(key)
        if got != value:
            add(Difference("param", f"param {key!r}", _q(value), _q(got), key))
    for key in sorted(found.params.keys() - expected.params.keys()) if not partial else ():
        add(Difference("param", f"param {key!r}", "none", _q(found.params[key]), key))

    for key, value in expected.tags.items():
        got = found.tags.get(key)
        if got != value:
            add(Difference("tag", f"tag {key!r}", _q(value), _q(got), key))
    for key in sorted(found.tags.keys() - expected.tags.keys()) if not partial else ():
        if not key.startswith(MLFLOW_TAG_PREFIX):  # MLflow's own tags the record does not set
            add(Difference("tag", f"tag {key!r}", "none", _q(found.tags[key]), key))

    for key, want in expected.metrics.items():
        have = found.metrics.get(key) or MetricSummary()
        if partial:  # other records may have logged to the key too
            if have.count < want.count:
                add(
                    Difference(
                        "metric_points",
                        f"metric {key!r} points",
                        f"at least {want.count}",
                        str(have.count),
                        key,
                    )
                )
            continue
        if have.count != want.count:
            add(
                Difference(
                    "metric_points",
                    f"metric {key!r} points",
                    str(want.count),
                    str(have.count),
                    key,
                )
            )
        if not same_point(want.last, have.last):
            add(
                Difference(
                    "metric_last",
                    f"metric {key!r} last value",
                    describe_point(want.last),
                    describe_point(have.last),
                    key,
                )
            )
    for key in sorted(found.metrics.keys() - expected.metrics.keys()) if not partial else ():
        add(
            Difference(
                "metric_points",
                f"metric {key!r} points",
                "0",
                str(found.metrics[key].count),
                key,
            )
        )

    for path, size in sorted(expected.artifacts.items()):
        got_size = found.artifacts.get(path)
        if path not in found.artifacts:
            add(Difference("artifact", f"artifact {path!r}", f"{size} bytes", "none", path))
        elif got_size != size:
            add(
                Difference(
                    "artifact",
                    f"artifact {path!r} size",
                    f"{size} bytes",
                    "unknown" if got_size is None else f"{got_size} bytes",
                    path,
                )
            )

    for name, digest in sorted(expected.datasets - found.datasets):
        add(Difference("dataset", f"dataset input {name!r}", f"digest {digest}", "none", name))
    for name, digest in sorted(found.datasets - expected.datasets) if not partial else ():
        add(Difference("dataset", f"dataset input {name!r}", "none", f"digest {digest}", name))

    diffs += compare_models(expected, found)

    got_parent = found.tags.get(PARENT_RUN_TAG)
    if expected.parent_record_id is not None:
        if not parent_known:
            add(
                Difference(
                    "parent",
                    f"parent link ({PARENT_RUN_TAG})",
                    f"the run of record {expected.parent_record_id}",
                    f"no run for that record (tag is {_q(got_parent)})",
                )
            )
        elif got_parent != parent_run_id:
            add(
                Difference(
                    "parent",
                    f"parent link ({PARENT_RUN_TAG})",
                    str(parent_run_id),
                    got_parent or "none",
                )
            )
    elif got_parent is not None and PARENT_RUN_TAG not in expected.tags and not partial:
        add(Difference("parent", f"parent link ({PARENT_RUN_TAG})", "none", got_parent))
    return diffs


def compare_models(expected: Expected, found: Found) -> list[Difference]:
    """Each record model's LoggedModel, its status, registered version and alias (pure)."""
    diffs: list[Difference] = []
    add = diffs.append
    for mid, want in sorted(expected.models.items()):
        label = f"logged model {want.name!r} ({MODEL_ID_TAG}={mid})"
        have = found.models.get(mid)
        if have is None:
            add(Difference("model", label, f"a LoggedModel of run {found.run_id}", "none", mid))
            continue
        if have.status != want.status:
            add(Difference("model", f"{label} status", want.status, have.status, mid))
        if have.source_run_id != found.run_id:
            add(
                Difference(
                    "model",
                    f"{label} source run",
                    found.run_id,
                    have.source_run_id or "none",
                    mid,
                )
            )
        name = want.registered_model_name
        if not name or want.status != "READY":
            continue
        if not have.versions:
            add(
                Difference(
                    "model_version",
                    f"registered model {name!r} version of {label}",
                    f"a version of model {have.model_id}",
                    "none",
                    name,
                )
            )
        if want.alias and (have.alias_version is None or have.alias_version not in have.versions):
            add(
                Difference(
                    "model_alias",
                    f"alias {want.alias!r} of registered model {name!r}",
                    " or ".join(f"version {v}" for v in have.versions) or "a version of the model",
                    "none" if have.alias_version is None else f"version {have.alias_version}",
                    name,
                )
            )
    return diffs


def compare_progress(
    expected: Expected, row: LedgerRecord | None, reason: str | None
) -> list[Difference]:
    """Complete lines the ledger has not checkpointed yet (``reason``: file replaced)."""
    diffs: list[Difference] = []
    if reason is not None:
        diffs.append(
            Difference(
                "replaced",
                "file continues what was synced",
                "yes",
                f"no: {reason}",
            )
        )
    done = 0 if (row is None or reason is not None) else row.line
    pending = expected.lines - done
    if pending > 0:
        where = "no checkpoint" if row is None else f"checkpoint at line {done}"
        diffs.append(
            Difference(
                "unmirrored",
                f"complete lines not yet mirrored ({where})",
                "0",
                str(pending),
            )
        )
    return diffs


# -- MLflow, read-only -------------------------------------------------------------------
