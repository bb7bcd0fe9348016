"""Run record format v1: one JSON line in, one validated event out (stdlib only).

The contract lives in docs/record-format.md. This module is pure: it never
touches the disk, the clock or MLflow, so the same rules hold for every
source and every writer.

A problem with a whole line (invalid JSON, a wrong field type) is a
:class:`RecordError`: the line is reported and skipped. A line this syncd
cannot understand (a newer version, an unknown event type) is an
:class:`UnsupportedVersion`: it and the rest of its record are held back. A problem
with one entry of an otherwise good line (one metric that is not a number)
drops that entry only and is reported beside the event: what can be kept is
kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from syncd.errors import RecordError, UnknownEventType, UnsupportedVersion

FORMAT_VERSION = 1
RECORD_FILENAME = "run_record.jsonl"

RUN_STARTED = "run_started"
PARAMS = "params"
METRICS = "metrics"
TAGS = "tags"
TAG_DELETED = "tag_deleted"
ARTIFACT = "artifact"
DATASET = "dataset"
MODEL = "model"
RUN_RESUMED = "run_resumed"
RUN_FINISHED = "run_finished"
EVENT_TYPES = frozenset(
    {
        RUN_STARTED,
        PARAMS,
        METRICS,
        TAGS,
        TAG_DELETED,
        ARTIFACT,
        DATASET,
        MODEL,
        RUN_RESUMED,
        RUN_FINISHED,
    }
)
EXTENSION_PREFIX = "x-"
FINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
MODEL_STATUSES = frozenset({"READY", "FAILED", "PENDING"})
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

UTF8_BOM = b"\xef\xbb\xbf"
MAX_INT64 = 2**63 - 1  # MLflow stores timestamps and steps as 64-bit integers
MAX_SEQ = 2**31 - 1  # the ledger stores seq as a 32-bit integer on every database

# record_id ends up in an MLflow search filter and in file names: keep it plain.
MLFLOW_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9]{1,64}\Z")
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

    if line == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]  # RFC 8259 lets a parser ignore a byte order mark
    obj = _decode_line(raw, fail)
    if not isinstance(obj, dict):
        raise fail(f"a line must be a JSON object, got {_type_name(obj)}")

    seq: Any = obj.get("seq")
    seq_or_none = seq if _is_int(seq) and 0 <= seq <= MAX_SEQ else None
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
    if seq_or_none is None:
        raise fail(f"field 'seq' must be an integer from 0 to {MAX_SEQ}")
    ts: Any = obj.get("ts")
    if not _is_int(ts) or not 0 <= ts <= MAX_INT64:
        raise fail(f"field 'ts' must be an integer from 0 to {MAX_INT64} (milliseconds)", seq)
    etype = obj.get("type")
    if not isinstance(etype, str):
        raise fail("field 'type' must be a string", seq)

    if etype.startswith(EXTENSION_PREFIX):
        return Event(seq=seq, ts=ts, type=etype, line=line, fields=obj)
    validate = _VALIDATORS.get(etype)
    if validate is None:
        raise UnknownEventType(
            f"unknown event type {_clip(repr(etype), 80)}: it needs a newer syncd (or is a"
            f" mistake; name your own types {EXTENSION_PREFIX}...); held back until syncd"
            " knows it",
            path=path,
            line=line,
            seq=seq,
        )
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


class HugeInt:
    """A JSON integer with more digits than Python converts: kept as text, never a number."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"<integer of {len(self.text)} digits>"


def _parse_int(text: str) -> int | HugeInt:
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits()
        return HugeInt(text)


# One decoder for every line (json.loads with options would build a new one per call).
_decode = json.JSONDecoder(parse_constant=_refuse_constant).decode
# Only for the rare line whose integers are too long to convert: they become HugeInt.
_decode_huge = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_parse_int).decode
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _decode_line(raw: bytes, fail: Callable[[str], RecordError]) -> Any:
    """The JSON value of a line; every way decoding can fail becomes a RecordError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        try:
            obj = _decode(text)
        except ValueError as exc:
            if "integer string conversion" not in str(exc):
                raise
            obj = _decode_huge(text)
    except json.JSONDecodeError as exc:
        raise fail(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise fail("invalid JSON: nested too deeply") from None
    except MemoryError:
        raise fail(f"invalid JSON: too large to decode ({len(raw)} bytes)") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise fail(f"invalid JSON: {_clip(str(exc))}") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        raise fail("invalid JSON: a \\u escape is an unpaired UTF-16 surrogate, not a character")
    return obj


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(value: object) -> str:
    if isinstance(value, HugeInt):
        return repr(value)
    if isinstance(value, bool):
        return "bool"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _show(value: object) -> str:
    """A value as a reason may quote it: short, whatever the value."""
    if isinstance(value, HugeInt):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "a number out of the range of a 64-bit float"
    return _clip(repr(value), 80)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_field(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _FieldError(f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise _FieldError(f"field {name!r} must be a string, got {_type_name(value)}")
    return value


def _mapping_field(obj: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        if required:
            raise _FieldError(f"field {name!r} is required")
        return {}
    if not isinstance(value, dict):
        raise _FieldError(f"field {name!r} must be an object, got {_type_name(value)}")
    return value


def _string_tags(raw: dict[str, Any], problems: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            tags[key] = value
        else:
            problems.append(
                f"tag {_clip(key, 80)!r}: value must be a string, got {_type_name(value)}"
            )
    return tags


def _validate_run_started(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    if obj["seq"] != 0:
        raise _FieldError(f"run_started must be seq 0, found at seq {obj['seq']}")
    record_id = _str_field(obj, "record_id", required=True)
    assert record_id is not None
    if not RECORD_ID_PATTERN.match(record_id):
        raise _FieldError(
            f"record_id {_clip(record_id, 80)!r} must be 1-128 letters, digits,"
            " '_', '.', ':' or '-'"
        )
    experiment = _str_field(obj, "experiment", required=False)
    if experiment is not None and not experiment.strip():
        raise _FieldError("field 'experiment' must not be empty")
    parent = _str_field(obj, "parent_record_id", required=False)
    if parent is not None and not RECORD_ID_PATTERN.match(parent):
        raise _FieldError(f"parent_record_id {_clip(parent, 80)!r} is not a valid record_id")
    if parent == record_id:
        problems.append("parent_record_id names the record itself; the run is not nested")
        parent = None
    mlflow_run_id = _str_field(obj, "mlflow_run_id", required=False)
    if mlflow_run_id is not None and not MLFLOW_RUN_ID_PATTERN.match(mlflow_run_id):
        raise _FieldError(
            f"mlflow_run_id {_clip(mlflow_run_id, 80)!r} must be 1-64 letters or digits"
        )
    fields: dict[str, Any] = {"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {}
    return {
        **fields,
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
    if isinstance(value, HugeInt):  # a number all the same: params are stored as text
        return value.text
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
                f"param {_clip(key, 80)!r}: value must be a string, number or bool,"
                f" got {_show(value) if isinstance(value, float) else _type_name(value)}"
            )
        else:
            params[key] = text
    return {"params": params}


def _metric_value(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        # JSON has no infinity: an infinite float came from a literal like 1e400.
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        return NON_FINITE.get(value)
    return None


def _validate_metrics(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    step = obj.get("step", 0)
    if not _is_int(step) or not -MAX_INT64 - 1 <= step <= MAX_INT64:
        raise _FieldError("field 'step' must be a 64-bit integer")
    metrics: dict[str, float] = {}
    for key, value in _mapping_field(obj, "metrics", required=True).items():
        number = _metric_value(value)
        if number is None:
            problems.append(
                f"metric {_clip(key, 80)!r}: value must be a number or 'NaN', 'Infinity',"
                f" '-Infinity', got {_show(value)}"
            )
        else:
            metrics[key] = number
    fields: dict[str, Any] = {"metrics": metrics, "step": step}
    model_id = obj.get("model_id")
    if model_id is not None:
        if isinstance(model_id, str) and RECORD_ID_PATTERN.match(model_id):
            fields["model_id"] = model_id
        else:
            problems.append(
                f"model_id {_show(model_id)} must be 1-128 letters, digits, '_', '.', ':' or '-'"
                " (the points are kept, not linked to a model)"
            )
    return fields


def _validate_tags(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {"tags": _string_tags(_mapping_field(obj, "tags", required=True), problems)}


def _validate_tag_deleted(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    key = _str_field(obj, "key", required=True)
    if not key:
        raise _FieldError("field 'key' must not be empty")
    return {"key": key}


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


def _validate_model(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    model_id = _str_field(obj, "model_id", required=True)
    assert model_id is not None
    if not RECORD_ID_PATTERN.match(model_id):
        raise _FieldError(
            f"model_id {_clip(model_id, 80)!r} must be 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    name = _str_field(obj, "name", required=True)
    path = _str_field(obj, "path", required=True)
    if not name or not path:
        raise _FieldError("fields 'name' and 'path' must not be empty")
    status = _str_field(obj, "status", required=False) or "READY"
    if status not in MODEL_STATUSES:
        raise _FieldError(
            f"status must be one of READY, FAILED, PENDING, got {_clip(repr(status), 80)}"
        )
    step = obj.get("step", 0)
    if not _is_int(step) or not -MAX_INT64 - 1 <= step <= MAX_INT64:
        raise _FieldError("field 'step' must be a 64-bit integer")
    flavors = obj.get("flavors", [])
    if not isinstance(flavors, list) or not all(isinstance(f, str) for f in flavors):
        raise _FieldError("field 'flavors' must be an array of strings")
    params = _validate_params({"params": obj.get("params") or {}}, problems)["params"]
    registered = _str_field(obj, "registered_model_name", required=False) or None
    alias = _str_field(obj, "alias", required=False) or None
    if alias is not None and registered is None:
        problems.append(f"alias {_clip(alias, 80)!r} without registered_model_name: ignored")
        alias = None
    return {
        "model_id": model_id,
        "name": name,
        "path": path,
        "model_type": _str_field(obj, "model_type", required=False),
        "flavors": list(flavors),
        "params": params,
        "tags": _string_tags(_mapping_field(obj, "tags", required=False), problems),
        "status": status,
        "step": step,
        "registered_model_name": registered,
        "alias": alias,
    }


def _validate_run_resumed(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {}


def _validate_run_finished(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    status = _str_field(obj, "status", required=True)
    if status not in FINAL_STATUSES:
        raise _FieldError(
            f"status must be one of FINISHED, FAILED, KILLED, got {_clip(repr(status), 80)}"
        )
    return {"status": status}


_VALIDATORS = {
    RUN_STARTED: _validate_run_started,
    PARAMS: _validate_params,
    METRICS: _validate_metrics,
    TAGS: _validate_tags,
    TAG_DELETED: _validate_tag_deleted,
    ARTIFACT: _validate_artifact,
    DATASET: _validate_dataset,
    MODEL: _validate_model,
    RUN_RESUMED: _validate_run_resumed,
    RUN_FINISHED: _validate_run_finished,
}
