"""TensorBoard event files (``events.out.tfevents.*``): scalars with their steps and wall
times, and hparams when present. Each folder holding event files is one run (as in
TensorBoard); its event files (several when a job restarted) are tailed by offset:
complete TFRecord frames only, read once, read again from the start when a file shrank.

The event protos come from the ``tensorboard`` extra (tensorboardX), imported lazily.
"""

from __future__ import annotations

import errno
import math
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncd.snapshot.translate import Problem, Translation, idle_end

if TYPE_CHECKING:
    from syncd.snapshot.derived import RunDir

EVENT_FILE_PREFIX = "events.out.tfevents."
_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data


def frames(data: bytes) -> tuple[list[bytes], int]:
    """The complete TFRecord frames at the start of ``data`` and the bytes they take."""
    out: list[bytes] = []
    pos = 0
    while len(data) - pos >= _HEADER:
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + _HEADER + length + _FOOTER
        if end > len(data):
            break
        out.append(data[pos + _HEADER : pos + _HEADER + length])
        pos = end
    return out, pos


@dataclass(frozen=True, slots=True)
class Scalar:
    file: str
    wall_ms: int
    step: int
    tag: str
    value: float | str


def _protos() -> tuple[Any, Any]:
    try:
        from tensorboardX.proto import event_pb2, plugin_hparams_pb2
    except ImportError as exc:
        raise OSError(
            errno.ENOPKG,
            "reading TensorBoard event files needs the tensorboard extra"
            " (pip install 'syncd[tensorboard]')",
        ) from exc
    return event_pb2, plugin_hparams_pb2


def _number(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode(
    file: str, records: list[bytes], problems: list[Problem]
) -> tuple[list[Scalar], dict[str, str]]:
    """Scalars and hparams of some event records (one bad record is reported, skipped)."""
    event_pb2, hparams_pb2 = _protos()
    scalars: list[Scalar] = []
    hparams: dict[str, str] = {}
    for raw in records:
        event = event_pb2.Event()
        try:
            event.ParseFromString(raw)
        except Exception as exc:  # a corrupt frame: reported, the others still land
            problems.append(Problem(file, "event", "tensorboard", f"not an event: {exc}"))
            continue
        if not event.HasField("summary"):
            continue
        wall_ms = int(event.wall_time * 1000)
        for value in event.summary.value:
            plugin = value.metadata.plugin_data.plugin_name
            if plugin == "hparams":
                data = hparams_pb2.HParamsPluginData()
                data.ParseFromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    for key, item in data.session_start_info.hparams.items():
                        kind = item.WhichOneof("kind")
                        if kind == "number_value":
                            hp = float(item.number_value)
                            hparams[key] = repr(int(hp)) if hp.is_integer() else repr(hp)
                        elif kind == "bool_value":
                            hparams[key] = "true" if item.bool_value else "false"
                        elif kind == "string_value":
                            hparams[key] = item.string_value
                continue
            which = value.WhichOneof("value")
            number: float | None = None
            if which == "simple_value":
                number = value.simple_value
            elif which == "tensor" and plugin in ("scalars", ""):
                tensor = value.tensor
                if tensor.float_val:
                    number = tensor.float_val[0]
                elif tensor.double_val:
                    number = tensor.double_val[0]
                elif len(tensor.tensor_content) == 4:
                    number = struct.unpack("<f", tensor.tensor_content)[0]
                elif len(tensor.tensor_content) == 8:
                    number = struct.unpack("<d", tensor.tensor_content)[0]
            if number is not None:
                scalars.append(Scalar(file, wall_ms, int(event.step), value.tag, _number(number)))
    return scalars, hparams


class TensorboardTranslator:
    """Reads the event files of one folder through a RunDir and translates them."""

    def __init__(
        self, primary: str, experiment: str | None = None, finish_after_idle: float | None = None
    ) -> None:
        self.primary = primary  # the folder's first event file: the record's identity
        self.experiment = experiment
        self.finish_after_idle = finish_after_idle  # seconds; None: never finished

    def translate(
        self, run_dir: RunDir, state: dict[str, Any] | None, default_record_id: str
    ) -> Translation:
        listing = run_dir.listing()
        names = sorted(
            rel for rel in listing if "/" not in rel and rel.startswith(EVENT_FILE_PREFIX)
        )
        if self.primary not in listing:
            raise FileNotFoundError(errno.ENOENT, "no such file", run_dir.display_of(self.primary))
        prev = state or {}
        new_state: dict[str, Any] = {
            "record_id": prev.get("record_id") or default_record_id,
            "params": dict(prev.get("params", {})),
            "offsets": dict(prev.get("offsets", {})),
            "problems": list(prev.get("problems", [])),
        }
        out = Translation()
        if state is None:
            name = run_dir.display.rstrip("/").rpartition("/")[2]
            started: dict[str, Any] = {
                "type": "run_started",
                "record_id": new_state["record_id"],
                "run_name": name,
                "tags": {"tensorboard.logdir": run_dir.display},
            }
            if self.experiment:
                started["experiment"] = self.experiment
            out.events.append(started)
        params: dict[str, str] = {}
        for rel in names:
            size = listing[rel][0]
            offset = int(new_state["offsets"].get(rel, 0))
            if size < offset:  # rewritten: from the start (the writes are idempotent)
                offset = 0
            if size == offset:
                continue
            data = run_dir.read(rel, offset) or b""
            records, used = frames(data)
            display = run_dir.display_of(rel)
            scalars, hparams = decode(display, records, out.problems)
            for scalar in scalars:
                out.events.append(
                    {
                        "type": "metrics",
                        "ts": scalar.wall_ms,
                        "step": scalar.step,
                        "metrics": {scalar.tag: scalar.value},
                    }
                )
            for key, text in hparams.items():
                if key not in new_state["params"]:
                    new_state["params"][key] = params[key] = text
            new_state["offsets"][rel] = offset + used
        if params:
            out.events.append({"type": "params", "params": params})
        seen = set(new_state["problems"])
        for problem in out.problems:
            if problem.key not in seen:
                seen.add(problem.key)
                out.new_problems.append(problem)
        new_state["problems"] = sorted(seen)
        out.state = new_state
        first = [e["ts"] for e in out.events if "ts" in e]
        out.start_ms = min(first) if first else listing[self.primary][1] // 1_000_000
        mtimes = [listing[rel][1] for rel in names]
        return idle_end(out, state, mtimes, self.finish_after_idle, time.time())


__all__ = ["TensorboardTranslator", "decode", "frames"]
