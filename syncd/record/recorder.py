"""RunRecorder: the writer training code uses (stdlib only, no MLflow import).

Every event is one ``os.write`` of one complete JSON line on a file opened with
O_APPEND, so a reader never sees half an event from a live writer, and a crash
leaves at most a torn last line, which the reader ignores until (never) its
newline arrives. Writes go to the kernel at once; ``finish`` also fsyncs.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from syncd.record.events import FORMAT_VERSION, RECORD_FILENAME

_log = logging.getLogger("syncd.recorder")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _metric_value(key: str, value: Any) -> float | str:
    if value.__class__ is bool:
        raise TypeError(f"metric {key!r}: a bool is not a metric value")
    number = float(value)
    if number - number == 0:  # finite
        return number
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def _param_value(key: str, value: Any) -> str | int | float | bool:
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if value - value == 0 else str(value)
    return str(value)


class RecordWriter:
    """The append side of one record file, shared by every writer of records.

    Each event is one ``os.write`` of one complete line on a descriptor opened
    with O_APPEND; a lock gives events from many threads distinct, ordered
    ``seq``. ``RunRecorder`` and the ``syncd:`` MLflow tracking store both
    write through it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        return self._fd

    def open(self) -> tuple[str, int] | None:
        """Open (creating folders and file); an existing record's (record_id, next seq).

        A torn last line of an existing record is trimmed first.
        """
        with self._lock:
            if self._fd is not None:
                raise RuntimeError(f"record {self.path} is already open")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                existing = _read_existing(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._seq = existing[1] if existing is not None else 0
            return existing

    def write(self, event_type: str, fields: Mapping[str, Any], ts: int | None = None) -> int:
        """Append one event (``ts`` defaults to now); its seq."""
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"record {self.path} is not open (call start() or use 'with')")
            line = _dumps(
                {
                    "v": FORMAT_VERSION,
                    "seq": self._seq,
                    "ts": _now_ms() if ts is None else ts,
                    "type": event_type,
                    **fields,
                }
            )
            data = (line + "\n").encode()
            written = os.write(self._fd, data)
            while written < len(data):  # only on a full disk or a signal; keep the line whole
                written += os.write(self._fd, data[written:])
            seq = self._seq
            self._seq += 1
            return seq

    def close(self, *, fsync: bool = True) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                if fsync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


# Where launchers put a process's global rank (torchrun, Lightning, Ray Train's torch
# backend: RANK; SLURM; Open MPI; MPICH/Intel MPI), first match wins.
GLOBAL_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank in a distributed job, 0 when it is not in one.

    ``LOCAL_RANK`` alone (a single-node launcher that sets nothing else) counts too.
    """
    env = os.environ if env is None else env
    for name in (*GLOBAL_RANK_VARS, "LOCAL_RANK"):
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a rank (an integer)") from None
    return 0


class RunRecorder:
    """Append run events to ``<run_dir>/run_record.jsonl``.

    Use it as a context manager: an exception inside the ``with`` ends the run
    FAILED, a KeyboardInterrupt KILLED, a clean exit FINISHED. Opening a run
    directory whose record already exists continues that record (a
    ``run_resumed`` event), so a restarted job keeps its MLflow run.

    Thread-safe: events from several threads get distinct, ordered ``seq``.

    ``enabled`` decides whether this process records at all: True (the default)
    always, False never, None only on global rank 0 of a distributed job (from
    ``RANK``, ``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK`` or
    ``LOCAL_RANK``), so every rank can run the same training code and one record
    is written. A disabled recorder accepts every call and writes nothing.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        experiment: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent: RunRecorder | str | None = None,
        description: str | None = None,
        *,
        filename: str = RECORD_FILENAME,
        enabled: bool | None = True,
    ) -> None:
        self.enabled = global_rank() == 0 if enabled is None else bool(enabled)
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / filename
        self._experiment = experiment
        self._run_name = run_name
        self._tags = dict(tags or {})
        self._parent = parent.record_id if isinstance(parent, RunRecorder) else parent
        self._description = description
        self._lock = threading.Lock()
        self._writer = RecordWriter(self.path)
        self._record_id: str | None = None
        self._finished = False

    # -- lifecycle -----------------------------------------------------------------

    @property
    def record_id(self) -> str:
        """The record's unique id (known once started)."""
        if not self.enabled:
            raise RuntimeError(f"this recorder is disabled (global rank {global_rank()})")
        if self._record_id is None:
            raise RuntimeError("the recorder has not been started")
        return self._record_id

    def start(self) -> RunRecorder:
        """Open the record: a new one (run_started) or an existing one (run_resumed)."""
        if not self.enabled:
            return self
        with self._lock:
            if self._writer.is_open:
                return self
            existing = self._writer.open()
            if existing is None and not self._experiment:
                self._writer.close(fsync=False)
                raise ValueError("a new run needs an experiment name")
            self._finished = False
            if existing is None:
                self._record_id = uuid.uuid4().hex
                self._writer.write("run_started", self._start_fields())
            else:
                self._record_id = existing[0]
                self._writer.write("run_resumed", {})
        return self

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED, fsync and close the record."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        if not self.enabled:
            return
        with self._lock:
            if not self._writer.is_open or self._finished:
                return
            self._writer.write("run_finished", {"status": status})
            self._finished = True
            self._writer.close(fsync=True)

    def __enter__(self) -> RunRecorder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # -- events --------------------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._append("params", {"params": {k: _param_value(k, v) for k, v in params.items()}})

    def log_metric(self, key: str, value: Any, step: int = 0) -> None:
        self.log_metrics({key: value}, step)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        values = {k: _metric_value(k, v) for k, v in metrics.items()}
        self._append("metrics", {"step": int(step), "metrics": values})

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._append("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def delete_tag(self, key: str) -> None:
        """Delete a run tag (deleting a tag that is not set is not an error)."""
        self._append("tag_deleted", {"key": key})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Record a file or folder inside the run directory as an artifact."""
        if self.enabled:
            self._append("artifact", self._artifact_fields(path, artifact_path))

    def log_model(
        self,
        path: str | os.PathLike[str],
        name: str,
        registered_model_name: str | None = None,
        alias: str | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        model_type: str | None = None,
    ) -> str:
        """Record a model folder of the run directory (e.g. one ``mlflow.<flavor>.save_model``
        wrote) as a logged model; its id.

        The daemon mirrors it as an MLflow LoggedModel of the run with these files and, when
        ``registered_model_name`` is given, registers a model version of it (and sets
        ``alias`` on that version).
        """
        if not self.enabled:
            return ""
        fields = self._artifact_fields(path, None)
        folder = self.run_dir / fields["path"]
        if not folder.is_dir():
            raise NotADirectoryError(f"model {path} must be a folder of the run directory")
        model_id = f"m-{uuid.uuid4().hex}"
        event: dict[str, Any] = {
            "model_id": model_id,
            "name": name,
            "path": fields["path"],
            "flavors": _flavors(folder),
            "status": "READY",
        }
        if model_type is not None:
            event["model_type"] = model_type
        if params:
            event["params"] = {k: str(v) for k, v in params.items()}
        if tags:
            event["tags"] = {k: str(v) for k, v in tags.items()}
        if registered_model_name is not None:
            event["registered_model_name"] = registered_model_name
        if alias is not None:
            if registered_model_name is None:
                raise ValueError("an alias needs a registered_model_name")
            event["alias"] = alias
        self._append("model", event)
        return model_id

    def log_input(
        self,
        name: str,
        source: str,
        digest: str | None = None,
        context: str | None = None,
    ) -> None:
        """Record a dataset the run reads (an MLflow dataset input)."""
        fields: dict[str, Any] = {"name": name, "source": source}
        if digest is not None:
            fields["digest"] = digest
        if context is not None:
            fields["context"] = context
        self._append("dataset", fields)

    # -- internals -----------------------------------------------------------------

    @property
    def _fd(self) -> int | None:
        return self._writer.fd

    def _append(self, event_type: str, fields: dict[str, Any]) -> None:
        if self.enabled:
            self._writer.write(event_type, fields)

    def _start_fields(self) -> dict[str, Any]:
        tags = {
            "mlflow.user": _user(),
            "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "<python>",
            "mlflow.source.type": "LOCAL",
        }
        tags.update({k: str(v) for k, v in self._tags.items()})
        fields: dict[str, Any] = {
            "record_id": self._record_id,
            "experiment": self._experiment,
            "tags": tags,
        }
        if self._run_name is not None:
            fields["run_name"] = self._run_name
        if self._parent is not None:
            fields["parent_record_id"] = self._parent
        if self._description is not None:
            fields["description"] = self._description
        return fields

    def _artifact_fields(
        self, path: str | os.PathLike[str], artifact_path: str | None
    ) -> dict[str, Any]:
        target = Path(path)
        if not target.is_absolute():
            target = self.run_dir / target
        resolved = target.resolve()
        root = self.run_dir.resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"artifact {path} is outside the run directory {self.run_dir}")
        if not resolved.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        fields: dict[str, Any] = {"path": resolved.relative_to(root).as_posix()}
        if artifact_path:
            fields["artifact_path"] = artifact_path
        return fields


def _read_existing(fd: int, path: Path) -> tuple[str, int] | None:
    """(record_id, next seq) of an existing record; trims a torn last line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    data = os.pread(fd, size, 0)
    end = data.rfind(b"\n") + 1
    if end < size:
        _log.warning("trimming an unfinished last line (%d bytes) of %s", size - end, path)
        os.ftruncate(fd, end)
    if end == 0:
        return None
    first = json.loads(data[: data.find(b"\n")])
    last_seq = -1
    for raw in reversed(data[: end - 1].split(b"\n")):
        try:
            seq = json.loads(raw).get("seq")
        except ValueError:
            continue
        if isinstance(seq, int):
            last_seq = seq
            break
    return str(first["record_id"]), last_seq + 1


def _flavors(folder: Path) -> list[str]:
    """The flavor names of an MLflow model folder's ``MLmodel`` file ([] without one).

    The keys directly under ``flavors:``, read line by line (no YAML parser here).
    """
    try:
        text = (folder / "MLmodel").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    flavors: list[str] = []
    inside, indent = False, -1
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth == 0:
            inside = stripped == "flavors:"
            indent = -1
            continue
        if inside and stripped.endswith(":") and indent in (-1, depth):
            indent = depth
            flavors.append(stripped[:-1])
    return flavors


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
