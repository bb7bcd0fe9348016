"""Pure: (mapping, last applied state, current snapshot) -> v1 events.

No disk, clock or MLflow here: the adapter reads the files, passes what it read and
the time, and appends what comes back. The *state* is what the events written so far
put into MLflow (params, tags, metrics, artifacts' sizes and mtimes, status), kept as
plain JSON so it can travel inside the derived record itself (an ``x-syncd-snapshot``
line after each batch): the last applied snapshot is always the record's own content.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from syncd.record.events import MLFLOW_RUN_ID_PATTERN, RECORD_ID_PATTERN
from syncd.snapshot.mapping import Mapping, Ref, parse_template

SNAPSHOT_EVENT = "x-syncd-snapshot"
PROBLEM_EVENT = "x-syncd-problem"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
CHANGED_TAG_PREFIX = "changed."
CHANGED_ARTIFACT_PATH = "changed"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the run directory holds now."""

    run_dir: str  # as shown to users (a path or an s3:// URI)
    docs: dict[str, Any]  # alias -> parsed document (an alias whose file is absent is left out)
    paths: dict[str, str]  # alias -> the file as shown to users
    files: dict[str, tuple[int, int]]  # every file of the run directory -> (size, mtime_ns)

    @property
    def run_dir_name(self) -> str:
        return self.run_dir.rstrip("/").rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class Problem:
    """A mapping entry that could not be applied to this run directory."""

    file: str
    field: str
    entry: str
    reason: str

    @property
    def key(self) -> str:
        return f"{self.entry}|{self.field}|{self.reason}"

    def describe(self) -> str:
        return f"{self.file}: field {self.field!r}: {self.reason} (mapping entry {self.entry})"

    def as_event(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_EVENT,
            "file": self.file,
            "field": self.field,
            "entry": self.entry,
            "reason": self.reason,
        }


@dataclass(slots=True)
class Translation:
    events: list[dict[str, Any]] = field(default_factory=list)  # without v, seq and ts
    state: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)  # every problem seen now
    new_problems: list[Problem] = field(default_factory=list)  # not reported before
    start_ms: int | None = None  # the run's start time, when the sources tell it
    # epoch seconds: translate again then even if no file changed (None: only on change)
    recheck_at: float | None = None


class _Missing:
    pass


MISSING = _Missing()


class _Renderer:
    def __init__(self, snap: Snapshot, problems: list[Problem]) -> None:
        self.snap = snap
        self.problems = problems

    def _file_of(self, ref: Ref) -> str:
        return self.snap.paths.get(ref.alias, f"{self.snap.run_dir}/{ref.alias}")

    def lookup(self, ref: Ref, entry: str) -> Any:
        """The referenced value, or MISSING (a problem is noted unless optional)."""
        if not ref.keys and ref.alias == "run_dir":
            return self.snap.run_dir
        if not ref.keys and ref.alias == "run_dir_name":
            return self.snap.run_dir_name
        if ref.alias not in self.snap.docs:
            if not ref.optional:
                self._note(ref, entry, "the file is missing")
            return MISSING
        value: Any = self.snap.docs[ref.alias]
        for depth, key in enumerate(ref.keys):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                if not ref.optional:
                    where = ".".join((ref.alias, *ref.keys[:depth])) if depth else "the file"
                    kind = _kind(value)
                    self._note(
                        ref,
                        entry,
                        "missing" if kind == "a mapping" else f"missing ({where} is {kind})",
                    )
                return MISSING
        if value is None:
            if not ref.optional:
                self._note(ref, entry, "is null")
            return MISSING
        return value

    def render(self, template: str, entry: str, *, raw: bool = False) -> Any:
        """A template's value: text, or with ``raw`` the referenced value itself when the
        template is exactly one reference. MISSING when a reference has no value."""
        parts = parse_template(template)
        if raw and len(parts) == 1 and isinstance(parts[0], Ref):
            value = self.lookup(parts[0], entry)
            if isinstance(value, dict | list):
                self._note(parts[0], entry, f"is {_kind(value)}, not a single value")
                return MISSING
            return value
        out: list[str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = self.lookup(part, entry)
            if value is MISSING:
                return MISSING
            if isinstance(value, dict | list):
                self._note(part, entry, f"is {_kind(value)}, not a single value")
                return MISSING
            out.append(text_of(value))
        return "".join(out)

    def _note(self, ref: Ref, entry: str, reason: str) -> None:
        self.problems.append(Problem(self._file_of(ref), ref.field, entry, reason))

    def refs_files(self, template: str) -> list[str]:
        """The files (relative paths) a template reads, for ``on_change: artifact``."""
        return [
            self.snap.paths[p.alias]
            for p in parse_template(template)
            if isinstance(p, Ref) and p.alias in self.snap.paths
        ]


def text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else type(value).__name__


def _metric_value(value: Any) -> float | str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return value if isinstance(value, int | float) else number


def translate(
    mapping: Mapping,
    previous: dict[str, Any] | None,
    snap: Snapshot,
    *,
    default_record_id: str,
    files_relative: dict[str, str] | None = None,
) -> Translation:
    """The events that bring MLflow from ``previous`` (None: nothing yet) to ``snap``.

    ``files_relative`` maps aliases to their paths relative to the run directory
    (default: the mapping's ``files``). Problems name the file, the field and the
    mapping entry; whatever else can be applied is.
    """
    out = Translation()
    render = _Renderer(snap, out.problems)
    prev = previous or {}
    state: dict[str, Any] = {
        "record_id": prev.get("record_id"),
        "experiment": prev.get("experiment"),
        "run_name": prev.get("run_name"),
        "parent": prev.get("parent"),
        "mlflow_run_id": prev.get("mlflow_run_id"),
        "status": prev.get("status"),
        "params": dict(prev.get("params", {})),
        "changed": dict(prev.get("changed", {})),
        "tags": dict(prev.get("tags", {})),
        "metrics": {k: list(v) for k, v in prev.get("metrics", {}).items()},
        "artifacts": {k: list(v) for k, v in prev.get("artifacts", {}).items()},
        "problems": list(prev.get("problems", [])),
    }
    relative = files_relative or dict(mapping.files)

    def identity(name: str) -> str | None:
        template = getattr(mapping, name)
        if template is None:
            return None
        value = render.render(template, name)
        return None if value is MISSING else str(value)

    # -- the run: fixed by the first translation ------------------------------------
    if previous is None:
        record_id = _valid_id(out, snap, mapping, "record_id", identity("record_id"))
        record_id = record_id or default_record_id
        started: dict[str, Any] = {"type": "run_started", "record_id": record_id}
        for name, key in (
            ("experiment", "experiment"),
            ("run_name", "run_name"),
            ("parent", "parent_record_id"),
            ("mlflow_run_id", "mlflow_run_id"),
        ):
            value = identity(name)
            if name in ("parent", "mlflow_run_id"):
                value = _valid_id(out, snap, mapping, name, value)
            state[name] = value
            if value:
                started[key] = value
        state["record_id"] = record_id
        out.events.append(started)
        if state["mlflow_run_id"]:
            out.events.append({"type": "run_resumed"})
    else:
        for name in ("record_id", "experiment", "parent", "mlflow_run_id"):
            value = identity(name)
            if value is not None and state[name] is not None and value != state[name]:
                out.problems.append(
                    Problem(
                        snap.paths.get(next(iter(mapping.files)), snap.run_dir),
                        name,
                        name,
                        f"changed from {state[name]!r} to {value!r} after the run was"
                        f" created; the run keeps {state[name]!r}",
                    )
                )
        run_name = identity("run_name")
        if run_name and run_name != state["run_name"]:
            state["run_name"] = run_name
            out.events.append({"type": "tags", "tags": {"mlflow.runName": run_name}})

    # -- params: write-once -----------------------------------------------------------
    prefix_value = render.render(mapping.params.prefix, "params.prefix")
    prefix = "" if prefix_value is MISSING else str(prefix_value)
    new_params: dict[str, str] = {}
    changed_tags: dict[str, str] = {}
    changed_files: list[str] = []
    for name, template in mapping.params.fields.items():
        entry = f"params.fields.{name}"
        value = render.render(template, entry, raw=True)
        if value is MISSING:
            continue
        key, text = prefix + name, text_of(value)
        mirrored = state["params"].get(key)
        if mirrored is None:
            state["params"][key] = text
            new_params[key] = text
        elif mirrored != text and state["changed"].get(key) != text:
            state["changed"][key] = text
            fields = [p.field for p in parse_template(template) if isinstance(p, Ref)]
            files = render.refs_files(template)
            out.problems.append(
                Problem(
                    files[0] if files else snap.run_dir,
                    ", ".join(fields) or name,
                    entry,
                    f"param {key!r} changed from {mirrored!r} to {text!r} after it was"
                    f" mirrored (params are write-once); the new value goes to"
                    + (
                        f" the tag {CHANGED_TAG_PREFIX}{key}"
                        if mapping.params.on_change == "tag"
                        else f" the artifact folder {CHANGED_ARTIFACT_PATH}/"
                    ),
                )
            )
            if mapping.params.on_change == "tag":
                changed_tags[CHANGED_TAG_PREFIX + key] = text
            else:
                changed_files.extend(
                    rel for alias, rel in relative.items() if alias in _aliases(template)
                )
    if new_params:
        out.events.append({"type": "params", "params": new_params})

    # -- tags: a later value wins -------------------------------------------------------
    tags: dict[str, str] = dict(changed_tags)
    for name, template in mapping.tags.items():
        value = render.render(template, f"tags.{name}", raw=True)
        if value is MISSING:
            continue
        text = text_of(value)
        if state["tags"].get(name) != text:
            state["tags"][name] = text
            tags[name] = text
    if tags:
        out.events.append({"type": "tags", "tags": tags})

    # -- metrics: a new point when the value changes ------------------------------------
    for name, template in mapping.metrics.items():
        entry = f"metrics.{name}"
        value = render.render(template, entry, raw=True)
        if value is MISSING:
            continue
        number = _metric_value(value)
        if number is None:
            parts = [p for p in parse_template(template) if isinstance(p, Ref)]
            out.problems.append(
                Problem(
                    snap.paths.get(parts[0].alias, snap.run_dir) if parts else snap.run_dir,
                    parts[0].field if parts else name,
                    entry,
                    f"is {_kind(value)} ({text_of(value)[:80]!r}), not a number",
                )
            )
            continue
        last = state["metrics"].get(name)
        if last is None or last[0] != number:
            step = 0 if last is None else int(last[1])
            state["metrics"][name] = [number, step + 1]
            out.events.append({"type": "metrics", "step": step, "metrics": {name: number}})

    # -- artifacts: a new or changed file ------------------------------------------------
    for index, spec in enumerate(mapping.artifacts):
        entry = f"artifacts[{index}]"
        target = None
        if spec.artifact_path is not None:
            rendered = render.render(spec.artifact_path, f"{entry}.artifact_path")
            if rendered is MISSING:
                continue
            target = str(rendered).strip("/") or None
        if spec.path is not None:
            path = spec.path.strip("/")
            folder = path + "/"
            under = [f for f in snap.files if f.startswith(folder)]
            if path in snap.files:
                matches = [(path, target, snap.files[path])]
            elif under:  # a folder: one artifact, changed when any file in it changes
                stamp = (
                    sum(snap.files[f][0] for f in under) * 1_000_003 + len(under),
                    max(snap.files[f][1] for f in under),
                )
                matches = [(path, target if target is not None else path, stamp)]
            else:
                matches = []
        else:
            assert spec.glob is not None
            matches = [
                (f, target if target is not None else _parent(f), snap.files[f])
                for f in sorted(snap.files)
                if fnmatch.fnmatchcase(f, spec.glob)
            ]
        if not matches:
            if spec.required:
                out.problems.append(
                    Problem(
                        f"{snap.run_dir}/{spec.path or spec.glob}",
                        spec.path or str(spec.glob),
                        entry,
                        "matches no file in the run directory",
                    )
                )
            continue
        for rel, artifact_path, stamp in matches:
            _artifact(out, state, rel, artifact_path, stamp)
    for rel in changed_files:
        if rel in snap.files:
            changed_stamp = list(snap.files[rel])
            key = f"{CHANGED_ARTIFACT_PATH}/{rel}"
            if state["artifacts"].get(key) != changed_stamp:
                state["artifacts"][key] = changed_stamp
                out.events.append(
                    {"type": "artifact", "path": rel, "artifact_path": CHANGED_ARTIFACT_PATH}
                )

    # -- status -----------------------------------------------------------------------
    if mapping.status is not None:
        value = render.render(mapping.status, "status")
        if value is not MISSING:
            status = str(value).strip().upper()
            if status in TERMINAL and status != state["status"]:
                state["status"] = status
                out.events.append({"type": "run_finished", "status": status})
            elif status == "RUNNING" and state["status"] in TERMINAL:
                state["status"] = None
                out.events.append({"type": "run_resumed"})
            elif status not in TERMINAL and status != "RUNNING":
                out.problems.append(
                    Problem(
                        snap.paths.get(next(iter(mapping.files)), snap.run_dir),
                        "status",
                        "status",
                        f"{status!r} is not RUNNING, FINISHED, FAILED or KILLED",
                    )
                )

    return finish(out, state)


def finish(out: Translation, state: dict[str, Any]) -> Translation:
    """Keep ``state`` on ``out``; a problem is new (reported) once per record."""
    seen = set(state["problems"])
    for problem in out.problems:
        if problem.key not in seen:
            seen.add(problem.key)
            out.new_problems.append(problem)
    state["problems"] = sorted(seen)
    out.state = state
    return out


def idle_end(
    out: Translation,
    previous: dict[str, Any] | None,
    source_mtimes_ns: list[int],
    finish_after_idle: float | None,
    now: float,
) -> Translation:
    """Give a folder-based run (DVCLive, TensorBoard) an end, in place on ``out``.

    Once no source file has changed for ``finish_after_idle`` seconds, a
    ``run_finished`` (FINISHED) is appended, timed at the last data point's wall time
    (the newest file's mtime when there is none). A finished run whose folder yields
    new data again gets a ``run_resumed`` before it (RUNNING again), and finishes
    again once idle. While the run is not finished, ``out.recheck_at`` says when to
    look again though nothing changed. ``None``: never finished by idleness.
    """
    prev = previous or {}
    state = out.state
    points = [int(e["ts"]) for e in out.events if e["type"] == "metrics" and "ts" in e]
    last_ms = max([*points, int(prev.get("last_ms") or 0)]) or None
    state["last_ms"] = last_ms
    finished = bool(prev.get("finished"))
    if finished and any(e["type"] != "run_started" for e in out.events):
        out.events.insert(0, {"type": "run_resumed"})
        finished = False
    newest = max(source_mtimes_ns, default=0) / 1e9
    if not finished and finish_after_idle is not None:
        if now - newest >= finish_after_idle:
            end_ms = last_ms if last_ms is not None else int(newest * 1000)
            out.events.append({"type": "run_finished", "status": "FINISHED", "ts": end_ms})
            finished = True
        else:
            out.recheck_at = newest + finish_after_idle
    state["finished"] = finished
    return out


def _valid_id(
    out: Translation, snap: Snapshot, mapping: Mapping, entry: str, value: str | None
) -> str | None:
    """``value`` when it is a valid record id (run id for mlflow_run_id), else None with a
    problem naming the entry."""
    if value is None:
        return None
    pattern = MLFLOW_RUN_ID_PATTERN if entry == "mlflow_run_id" else RECORD_ID_PATTERN
    if pattern.match(value):
        return value
    template = getattr(mapping, entry) or ""
    refs = [p for p in parse_template(template) if isinstance(p, Ref)]
    kind = "MLflow run id" if entry == "mlflow_run_id" else "record id"
    out.problems.append(
        Problem(
            snap.paths.get(refs[0].alias, snap.run_dir) if refs else snap.run_dir,
            refs[0].field if refs else entry,
            entry,
            f"{value[:80]!r} is not a valid {kind}"
            + (" (the default id is used)" if entry == "record_id" else " (ignored)"),
        )
    )
    return None


def _artifact(
    out: Translation,
    state: dict[str, Any],
    rel: str,
    target: str | None,
    stamp: tuple[int, int],
) -> None:
    key = f"{target or ''}/{rel}"
    if state["artifacts"].get(key) == list(stamp):
        return
    state["artifacts"][key] = list(stamp)
    event: dict[str, Any] = {"type": "artifact", "path": rel}
    if target:
        event["artifact_path"] = target
    out.events.append(event)


def _parent(rel: str) -> str | None:
    head = rel.rpartition("/")[0]
    return head or None


def _aliases(template: str) -> set[str]:
    return {p.alias for p in parse_template(template) if isinstance(p, Ref)}


__all__ = ["PROBLEM_EVENT", "SNAPSHOT_EVENT", "Problem", "Snapshot", "Translation", "translate"]
