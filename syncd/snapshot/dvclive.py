"""DVCLive output folders: ``metrics.json`` (the summary), ``params.yaml`` and the
append-only ``plots/metrics/**/*.tsv`` histories (``step``, the value, and a
``timestamp`` in milliseconds when DVCLive was asked for one).

``translate_dvclive`` is pure: the adapter (:class:`DvcliveTranslator`) reads the
summary, the params and each history file from the offset the last batch consumed,
and the state in the derived record remembers those offsets, so a history is tailed
like a record: complete lines only, read once, and read again from the start when
the file shrank or its header changed (a rewritten file).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncd.snapshot.translate import (
    CHANGED_TAG_PREFIX,
    Problem,
    Translation,
    finish,
    idle_end,
)

if TYPE_CHECKING:
    from syncd.snapshot.derived import RunDir

PRIMARY = "metrics.json"
PARAMS = "params.yaml"
HISTORIES = "plots/metrics/"


@dataclass(frozen=True, slots=True)
class TsvTail:
    """The bytes of one history file from ``start`` (0: the whole file, header included)."""

    rel: str
    display: str
    header: str  # the file's first line, without its newline
    start: int
    data: bytes
    mtime_ms: int  # for rows without a timestamp column


@dataclass(frozen=True, slots=True)
class DvcliveView:
    run_dir: str
    run_name: str
    experiment: str | None
    params: Any  # parsed params.yaml (None: absent)
    params_path: str
    summary: Any  # parsed metrics.json
    summary_path: str
    summary_mtime_ms: int
    tails: tuple[TsvTail, ...]


def metric_name(rel: str) -> str:
    return rel[len(HISTORIES) : -len(".tsv")]


def _flatten(value: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, sep, f"{prefix}{key}{sep}"))
        return out
    return {prefix[: -len(sep)]: value} if prefix else {}


def _number(text: Any) -> float | str | None:
    if isinstance(text, bool):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def translate_dvclive(
    previous: dict[str, Any] | None, view: DvcliveView, *, default_record_id: str
) -> Translation:
    out = Translation()
    prev = previous or {}
    state: dict[str, Any] = {
        "record_id": prev.get("record_id") or default_record_id,
        "params": dict(prev.get("params", {})),
        "changed": dict(prev.get("changed", {})),
        "summary": {k: list(v) for k, v in prev.get("summary", {}).items()},
        "tsv": {k: dict(v) for k, v in prev.get("tsv", {}).items()},
        "problems": list(prev.get("problems", [])),
    }
    if previous is None:
        started: dict[str, Any] = {
            "type": "run_started",
            "record_id": state["record_id"],
            "run_name": view.run_name,
            "tags": {"dvclive.dir": view.run_dir},
        }
        if view.experiment:
            started["experiment"] = view.experiment
        out.events.append(started)

    # params.yaml: write-once params; a changed value is reported and goes to a tag
    if view.params is not None and not isinstance(view.params, dict):
        out.problems.append(Problem(view.params_path, "(top)", "params", "is not a mapping"))
    new_params: dict[str, str] = {}
    changed: dict[str, str] = {}
    for key, value in _flatten(view.params or {}, ".").items():
        text = _param_text(value)
        mirrored = state["params"].get(key)
        if mirrored is None:
            state["params"][key] = new_params[key] = text
        elif mirrored != text and state["changed"].get(key) != text:
            state["changed"][key] = changed[CHANGED_TAG_PREFIX + key] = text
            out.problems.append(
                Problem(
                    view.params_path,
                    key,
                    "params",
                    f"param {key!r} changed from {mirrored!r} to {text!r} after it was"
                    f" mirrored (params are write-once); the new value goes to the tag"
                    f" {CHANGED_TAG_PREFIX}{key}",
                )
            )
    if new_params:
        out.events.append({"type": "params", "params": new_params})
    if changed:
        out.events.append({"type": "tags", "tags": changed})

    # plots/metrics/**/*.tsv: every complete row once
    histories = set()
    for tail in view.tails:
        name = metric_name(tail.rel)
        histories.add(name)
        columns = tail.header.split("\t")
        if "step" not in columns or len(columns) < 2:
            out.problems.append(
                Problem(tail.display, name, "plots/metrics", f"header {tail.header!r}: no step")
            )
            continue
        step_at = columns.index("step")
        ts_at = columns.index("timestamp") if "timestamp" in columns else None
        value_at = len(columns) - 1
        data = tail.data
        body_from = 0
        if tail.start == 0:  # the header is part of the data
            first = data.find(b"\n")
            body_from = first + 1 if first >= 0 else len(data)
        end = data.rfind(b"\n")
        complete = data[body_from : end + 1] if end >= body_from else b""
        for row in complete.decode("utf-8", "replace").splitlines():
            cells = row.split("\t")
            value = _number(cells[value_at]) if len(cells) == len(columns) else None
            try:
                step = int(cells[step_at])
                ts = int(float(cells[ts_at])) if ts_at is not None else tail.mtime_ms
            except (ValueError, IndexError):
                value = None
            if value is None:
                out.problems.append(
                    Problem(tail.display, name, "plots/metrics", f"row {row[:80]!r} is not valid")
                )
                continue
            out.events.append({"type": "metrics", "ts": ts, "step": step, "metrics": {name: value}})
        consumed = end + 1 if end >= body_from else body_from
        state["tsv"][tail.rel] = {"offset": tail.start + consumed, "header": tail.header}

    # metrics.json: values logged without a history (plot=False), at the summary's step
    summary = view.summary if isinstance(view.summary, dict) else {}
    step = summary.get("step", 0)
    step = step if isinstance(step, int) and not isinstance(step, bool) else 0
    for key, raw in _flatten(summary, "/").items():
        if key == "step" or key in histories:
            continue
        value = _number(raw)
        if value is None:
            out.problems.append(Problem(view.summary_path, key, "metrics.json", "not a number"))
            continue
        last = state["summary"].get(key)
        if last is None or last != [value, step]:
            state["summary"][key] = [value, step]
            point = {"type": "metrics", "ts": view.summary_mtime_ms, "step": step}
            out.events.append({**point, "metrics": {key: value}})

    return finish(out, state)


class DvcliveTranslator:
    """Reads a DVCLive folder through a RunDir and translates it (the adapter half)."""

    primary = PRIMARY

    def __init__(
        self, experiment: str | None = None, finish_after_idle: float | None = None
    ) -> None:
        self.experiment = experiment
        self.finish_after_idle = finish_after_idle  # seconds; None: never finished

    def translate(
        self, run_dir: RunDir, state: dict[str, Any] | None, default_record_id: str
    ) -> Translation:
        from syncd.snapshot.derived import read_document

        listing = run_dir.listing()
        if PRIMARY not in listing:
            import errno

            raise FileNotFoundError(errno.ENOENT, "no such file", run_dir.display_of(PRIMARY))
        summary = read_document(run_dir, PRIMARY)
        params = read_document(run_dir, PARAMS) if PARAMS in listing else None
        offsets = (state or {}).get("tsv", {})
        tails = []
        for rel in sorted(listing):
            if not (rel.startswith(HISTORIES) and rel.endswith(".tsv")):
                continue
            size, mtime_ns = listing[rel]
            prev = offsets.get(rel)
            start = 0
            header = ""
            if prev is not None and size >= int(prev["offset"]):
                head = run_dir.read(rel, 0, len(prev["header"]) + 1) or b""
                if head == (prev["header"] + "\n").encode():
                    start, header = int(prev["offset"]), str(prev["header"])
            data = run_dir.read(rel, start) or b""
            if start == 0:
                header = data.split(b"\n", 1)[0].decode("utf-8", "replace") if b"\n" in data else ""
                if not header:
                    continue  # not even a header yet
            tails.append(
                TsvTail(rel, run_dir.display_of(rel), header, start, data, mtime_ns // 1_000_000)
            )
        name = run_dir.display.rstrip("/").rpartition("/")[2]
        if name == "dvclive":  # DVCLive's default folder: the project's folder names the run
            name = run_dir.display.rstrip("/").rpartition("/")[0].rpartition("/")[2] or name
        view = DvcliveView(
            run_dir=run_dir.display,
            run_name=name,
            experiment=self.experiment,
            params=params,
            params_path=run_dir.display_of(PARAMS),
            summary=summary,
            summary_path=run_dir.display_of(PRIMARY),
            summary_mtime_ms=listing[PRIMARY][1] // 1_000_000,
            tails=tuple(tails),
        )
        result = translate_dvclive(state, view, default_record_id=default_record_id)
        result.start_ms = min([t.mtime_ms for t in tails] + [view.summary_mtime_ms])
        read = [
            mtime
            for rel, (_size, mtime) in listing.items()
            if rel in (PRIMARY, PARAMS) or (rel.startswith(HISTORIES) and rel.endswith(".tsv"))
        ]
        return idle_end(result, state, read, self.finish_after_idle, time.time())


__all__ = ["DvcliveTranslator", "DvcliveView", "TsvTail", "translate_dvclive"]
