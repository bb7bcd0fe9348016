"""Run record format v1: one JSON line in, one validated event out (stdlib only).

The contract lives in docs/record-format.md. This module is pure: it never
touches the disk, the clock or MLflow, so the same rules hold for every
source and every writer.

A problem with a whole line (invalid JSON, an unknown type, a wrong field
type) is a :class:`RecordError`: the line is reported and skipped. A problem
with one entry of an otherwise good line (one metric that is not a number)
drops that entry only and is reported beside the event: what can be kept is
kept.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from syncd.errors import RecordError, UnsupportedVersion

FORMAT_VERSION = 1
RECORD_FILENAME = "run_record.jsonl"

RUN_STARTED = "run_started"
PARAMS = "params"
METRICS = "metrics"
TAGS = "tags"
ARTIFACT = "artifact"
DATASET = "dataset"
RUN_RESUMED = "run_resumed"
RUN_FINISHED = "run_finished"
EVENT_TYPES = frozenset(
    {RUN_STARTED, PARAMS, METRICS, TAGS, ARTIFACT, DATASET, RUN_RESUMED, RUN_FINISHED}
)
EXTENSION_PREFIX = "x-"
FINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# record_id ends up in an MLflow search filter and in file names: keep it plain.
RECORD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(slots=True)
class Event:
    """One valid line of a record. ``fields`` holds the type's fields, normalised."""

    seq: int
    ts: int
    type: str
    line: int
    fields: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def is_extension(self) -> bool:
        return self.type.startswith(EXTENSION_PREFIX)


def parse_line(raw: bytes, *, line: int, path: str = "") -> Event:
    """Decode and validate one complete line (without its newline).

    Raises RecordError (or UnsupportedVersion) naming the path, line and reason.
    """

    def fail(reason: str, seq: int | None = None) -> RecordError:
        return RecordError(reason, path=path, line=line, seq=seq)

    try:
        obj = _decode(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise fail(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise fail(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise fail(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise fail(f"a line must be a JSON object, got {type(obj).__name__}")

    seq: Any = obj.get("seq")
    seq_or_none = seq if _is_int(seq) else None
    version: Any = obj.get("v")
    if not _is_int(version):
        raise fail("field 'v' (format version) must be an integer", seq_or_none)
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"unsupported version {version} (this syncd reads version {FORMAT_VERSION});"
            " held back until syncd is upgraded",
            path=path,
            line=line,
            seq=seq_or_none,
        )
    if version < FORMAT_VERSION:
        raise fail(f"unsupported version {version}", seq_or_none)
    if seq_or_none is None or seq_or_none < 0:
        raise fail("field 'seq' must be a non-negative integer")
    ts: Any = obj.get("ts")
    if not _is_int(ts) or ts < 0:
        raise fail("field 'ts' must be a non-negative integer (milliseconds)", seq)
    etype = obj.get("type")
    if not isinstance(etype, str):
        raise fail("field 'type' must be a string", seq)

    if etype.startswith(EXTENSION_PREFIX):
        return Event(seq=seq, ts=ts, type=etype, line=line, fields=obj)
    validate = _VALIDATORS.get(etype)
    if validate is None:
        raise fail(f"unknown event type {etype!r}", seq)
    problems: list[str] = []
    try:
        fields = validate(obj, problems)
    except _FieldError as exc:
        raise fail(f"{etype}: {exc}", seq) from None
    return Event(seq=seq, ts=ts, type=etype, line=line, fields=fields, problems=problems)


class _FieldError(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise ValueError(f'bare {name} is not JSON; write it as the string "{name}"')


# One decoder for every line (json.loads with options would build a new one per call).
_decode = json.JSONDecoder(parse_constant=_refuse_constant).decode


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_field(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _FieldError(f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise _FieldError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _mapping_field(obj: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        if required:
            raise _FieldError(f"field {name!r} is required")
        return {}
    if not isinstance(value, dict):
        raise _FieldError(f"field {name!r} must be an object, got {type(value).__name__}")
    return value


def _string_tags(raw: dict[str, Any], problems: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            tags[key] = value
        else:
            problems.append(f"tag {key!r}: value must be a string, got {type(value).__name__}")
    return tags


def _validate_run_started(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    if obj["seq"] != 0:
        raise _FieldError(f"run_started must be seq 0, found at seq {obj['seq']}")
    record_id = _str_field(obj, "record_id", required=True)
    assert record_id is not None
    if not RECORD_ID_PATTERN.match(record_id):
        raise _FieldError(
            f"record_id {record_id!r} must be 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    experiment = _str_field(obj, "experiment", required=False)
    if experiment is not None and not experiment.strip():
        raise _FieldError("field 'experiment' must not be empty")
    parent = _str_field(obj, "parent_record_id", required=False)
    if parent is not None and not RECORD_ID_PATTERN.match(parent):
        raise _FieldError(f"parent_record_id {parent!r} is not a valid record_id")
    return {
        "record_id": record_id,
        "experiment": experiment,
        "run_name": _str_field(obj, "run_name", required=False),
        "tags": _string_tags(_mapping_field(obj, "tags", required=False), problems),
        "parent_record_id": parent,
        "description": _str_field(obj, "description", required=False),
    }


def _param_value(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(value) if math.isfinite(value) else None
    return None


def _validate_params(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    params: dict[str, str] = {}
    for key, value in _mapping_field(obj, "params", required=True).items():
        text = _param_value(value)
        if text is None:
            problems.append(
                f"param {key!r}: value must be a string, number or bool, got {type(value).__name__}"
            )
        else:
            params[key] = text
    return {"params": params}


def _metric_value(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, str):
        return NON_FINITE.get(value)
    return None


def _validate_metrics(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    step = obj.get("step", 0)
    if not _is_int(step):
        raise _FieldError("field 'step' must be an integer")
    metrics: dict[str, float] = {}
    for key, value in _mapping_field(obj, "metrics", required=True).items():
        number = _metric_value(value)
        if number is None:
            problems.append(
                f"metric {key!r}: value must be a number or 'NaN', 'Infinity', '-Infinity',"
                f" got {value!r}"
            )
        else:
            metrics[key] = number
    return {"metrics": metrics, "step": step}


def _validate_tags(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {"tags": _string_tags(_mapping_field(obj, "tags", required=True), problems)}


def _validate_artifact(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    path = _str_field(obj, "path", required=True)
    if not path:
        raise _FieldError("field 'path' must not be empty")
    artifact_path = _str_field(obj, "artifact_path", required=False)
    return {"path": path, "artifact_path": artifact_path or None}


def _validate_dataset(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {
        "name": _str_field(obj, "name", required=True),
        "source": _str_field(obj, "source", required=True),
        "digest": _str_field(obj, "digest", required=False),
        "context": _str_field(obj, "context", required=False),
    }


def _validate_run_resumed(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {}


def _validate_run_finished(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    status = _str_field(obj, "status", required=True)
    if status not in FINAL_STATUSES:
        raise _FieldError(f"status must be one of FINISHED, FAILED, KILLED, got {status!r}")
    return {"status": status}


_VALIDATORS = {
    RUN_STARTED: _validate_run_started,
    PARAMS: _validate_params,
    METRICS: _validate_metrics,
    TAGS: _validate_tags,
    ARTIFACT: _validate_artifact,
    DATASET: _validate_dataset,
    RUN_RESUMED: _validate_run_resumed,
    RUN_FINISHED: _validate_run_finished,
}
