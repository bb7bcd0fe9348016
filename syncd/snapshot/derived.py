"""The derived record: v1 events syncd writes for a snapshot run directory, synced by the
engine like any record.

Each sync first *refreshes* the derived record: the run directory's files are read, the
pure translator diffs them against the state stored in the record's last
``x-syncd-snapshot`` line, and the new events plus a new snapshot line are appended in
one write, then fsynced. The last applied snapshot is thus the record's own content: a
kill before the write leaves the old state (the next refresh translates again), a write
torn by a crash leaves a tail without its snapshot line, which the next refresh cuts
off before appending. A lock file serialises refreshes of one run directory across
processes. Artifacts are read from the source run directory, with the usual confinement.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog
import yaml

from syncd.artifacts import ResolvedArtifact
from syncd.artifacts import resolve_artifact as resolve_local_artifact
from syncd.snapshot.mapping import Mapping
from syncd.snapshot.translate import SNAPSHOT_EVENT, Snapshot, Translation, translate

log = structlog.get_logger("syncd.snapshot")

DERIVED_FOLDER = "derived"


class RunDir(Protocol):
    """A run directory holding snapshot files, wherever it is stored."""

    @property
    def display(self) -> str: ...

    def uri_of(self, rel: str) -> str: ...

    def display_of(self, rel: str) -> str: ...

    def read(self, rel: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """The file's bytes from ``offset`` (``length`` at most); None when it does not exist."""
        ...

    def listing(self) -> dict[str, tuple[int, int]]:
        """Every file (relative POSIX path) -> (size, mtime_ns)."""
        ...

    def fingerprint(self) -> list[list[Any]]:
        """Every file with what tells a change: [path, size, mtime_ns] (S3: and the ETag)."""
        ...

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact: ...


class Translator(Protocol):
    """Turns a run directory and the last applied state into the next batch of events."""

    @property
    def primary(self) -> str:
        """The file (relative path) whose presence makes a folder a run directory."""
        ...

    def translate(
        self, run_dir: RunDir, state: dict[str, Any] | None, default_record_id: str
    ) -> Translation: ...


class SnapshotTranslator:
    """A mapping applied to a run directory's snapshot files."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping

    @property
    def primary(self) -> str:
        return self.mapping.primary

    def translate(
        self, run_dir: RunDir, state: dict[str, Any] | None, default_record_id: str
    ) -> Translation:
        snap = read_snapshot(run_dir, self.mapping)
        result = translate(self.mapping, state, snap, default_record_id=default_record_id)
        primary = snap.files.get(self.mapping.primary)
        result.start_ms = primary[1] // 1_000_000 if primary else None
        return result


class LocalRunDir:
    def __init__(self, path: Path) -> None:
        self.path = path.absolute()

    @property
    def display(self) -> str:
        return str(self.path)

    def uri_of(self, rel: str) -> str:
        return (self.path / rel).as_uri()

    def display_of(self, rel: str) -> str:
        return str(self.path / rel)

    def read(self, rel: str, offset: int = 0, length: int | None = None) -> bytes | None:
        try:
            with (self.path / rel).open("rb") as fh:
                fh.seek(offset)
                return fh.read(-1 if length is None else length)
        except FileNotFoundError:
            return None

    def listing(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                full = Path(dirpath) / name
                try:
                    st = full.lstat()
                except OSError:
                    continue
                out[full.relative_to(self.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def fingerprint(self) -> list[list[Any]]:
        return [[rel, size, mtime] for rel, (size, mtime) in sorted(self.listing().items())]

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        return resolve_local_artifact(self.path, path, artifact_path)


class S3RunDir:
    """A run directory under an S3 key prefix (the folder of the primary object)."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def display(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def uri_of(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def display_of(self, rel: str) -> str:
        return self.uri_of(rel)

    def read(self, rel: str, offset: int = 0, length: int | None = None) -> bytes | None:
        from syncd.sources.s3 import S3SourceError, _code, _not_found, describe_error

        last = "" if length is None else str(offset + max(length, 1) - 1)
        extra = {"Range": f"bytes={offset}-{last}"} if offset or length is not None else {}
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **extra)["Body"]
            return bytes(body.read())
        except Exception as exc:
            if _not_found(exc):
                return None
            if offset and _code(exc) == "InvalidRange":  # from the end of the file: nothing
                return b""
            raise S3SourceError(errno.EIO, describe_error(exc, self.uri_of(rel))) from exc

    def listing(self) -> dict[str, tuple[int, int]]:
        from syncd.sources.s3 import list_records

        base = f"{self.prefix}/" if self.prefix else ""
        return {
            obj.key[len(base) :]: (obj.size, obj.last_modified_ns)
            for obj in list_records(self.client, self.display, "**")
        }

    def fingerprint(self) -> list[list[Any]]:
        from syncd.sources.s3 import list_records

        base = f"{self.prefix}/" if self.prefix else ""
        return [
            [obj.key[len(base) :], obj.size, obj.last_modified_ns, obj.etag]
            for obj in list_records(self.client, self.display, "**")
        ]

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        from syncd.sources.s3 import resolve_artifact

        return resolve_artifact(self.client, self.bucket, self.prefix, path, artifact_path)


def derived_folder(state_dir: Path, uri: str) -> Path:
    """Where the derived record of the run directory whose primary file is ``uri`` lives."""
    return state_dir / DERIVED_FOLDER / hashlib.sha256(uri.encode()).hexdigest()[:32]


def recheck_due(state_dir: Path, uri: str, now: float) -> bool:
    """The derived record at ``uri`` asked to be translated again by ``now`` though its
    files did not change (an idle run to end), or was never translated."""
    try:
        known = json.loads((derived_folder(state_dir, uri) / "source.json").read_bytes())
    except (OSError, ValueError):
        return True
    recheck = known.get("recheck_at") if isinstance(known, dict) else None
    return isinstance(recheck, int | float) and recheck <= now


def parse_document(name: str, raw: bytes) -> Any:
    """A snapshot file's content: JSON for ``*.json``, YAML otherwise; ValueError if bad."""
    text = raw.decode("utf-8")
    if PurePosixPath(name).suffix.lower() == ".json":
        return json.loads(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from exc


def read_document(run_dir: RunDir, rel: str) -> Any:
    """One parsed file (None when absent); an OSError naming it when it cannot be parsed."""
    raw = run_dir.read(rel)
    return None if raw is None else _parsed(run_dir, rel, raw)


def _parsed(run_dir: RunDir, rel: str, raw: bytes) -> Any:
    """A file's content; an OSError naming it when it is empty or cannot be parsed (a
    file rewritten in place may be caught half-written: the record is tried again)."""
    if not raw.strip():
        raise OSError(errno.EAGAIN, "empty (being rewritten?)", run_dir.display_of(rel))
    try:
        return parse_document(rel, raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if rel.endswith(".json") else "YAML"
        raise OSError(
            errno.EINVAL, f"not valid {kind} ({str(exc)[:300]})", run_dir.display_of(rel)
        ) from exc


def read_snapshot(run_dir: RunDir, mapping: Mapping) -> Snapshot:
    """The run directory's files now. FileNotFoundError when the primary file is gone; an
    OSError naming the file when one cannot be parsed (it may be half-written: the
    record is tried again later)."""
    docs: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for alias, rel in mapping.files.items():
        paths[alias] = run_dir.display_of(rel)
        raw = run_dir.read(rel)
        if raw is None:
            if rel == mapping.primary:
                raise FileNotFoundError(errno.ENOENT, "no such file", run_dir.display_of(rel))
            continue
        docs[alias] = _parsed(run_dir, rel, raw)
    return Snapshot(run_dir=run_dir.display, docs=docs, paths=paths, files=run_dir.listing())


def default_record_id(uri: str) -> str:
    return "snap-" + hashlib.sha256(uri.encode()).hexdigest()[:24]


_SNAPSHOT_MARK = b'"type":"' + SNAPSHOT_EVENT.encode() + b'"'


def _lines_state(content: bytes) -> tuple[int, int, dict[str, Any] | None]:
    """(bytes up to the end of the last snapshot line, last seq there, its state).

    Only the last complete snapshot line is parsed (found from the end: the marker's
    quotes cannot appear unescaped inside a JSON string), so a long derived record
    costs one search, not a parse of every line.
    """
    end = len(content)
    while True:
        at = content.rfind(_SNAPSHOT_MARK, 0, end)
        if at < 0:
            return 0, -1, None
        start = content.rfind(b"\n", 0, at) + 1
        stop = content.find(b"\n", at)
        if stop >= 0:
            try:
                obj = json.loads(content[start:stop])
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("type") == SNAPSHOT_EVENT:
                return stop + 1, int(obj["seq"]), obj.get("state")
        end = start  # a torn or unreadable snapshot line: look before it


def encode_events(events: list[dict[str, Any]], first_seq: int, ts: int) -> bytes:
    out = []
    for offset, event in enumerate(events):
        line = {"v": 1, "seq": first_seq + offset, "ts": event.pop("ts", ts), **event}
        out.append(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n")
    return "".join(out).encode()


def batch_of(translation: Translation) -> list[dict[str, Any]]:
    """The lines one refresh appends: events, problems, then the new snapshot state."""
    events = [dict(e) for e in translation.events]
    if events and events[0]["type"] == "run_started" and translation.start_ms is not None:
        events[0].setdefault("ts", translation.start_ms)
    events.extend(p.as_event() for p in translation.new_problems)
    events.append({"type": SNAPSHOT_EVENT, "state": translation.state})
    return events


class DerivedRecord:
    """A RecordFile whose bytes syncd derives from a snapshot run directory.

    ``uri`` and ``display`` are the primary file's (the ledger key, what users see);
    the bytes live in ``<state_dir>/derived/<hash>/run_record.jsonl``. With
    ``state_dir=None`` (dry runs) the record is derived in memory and nothing is written.
    """

    def __init__(
        self,
        run_dir: RunDir,
        translator: Translator | Mapping,
        state_dir: Path | None,
        *,
        read_only: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.read_only = read_only  # verify: read what was derived, derive nothing
        self.translator: Translator = (
            SnapshotTranslator(translator) if isinstance(translator, Mapping) else translator
        )
        self._uri = run_dir.uri_of(self.translator.primary)
        self.folder = derived_folder(state_dir, self._uri) if state_dir is not None else None
        self._memory = b""
        self._fd: int | None = None
        self.last: Translation | None = None

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def display(self) -> str:
        return self.run_dir.display_of(self.translator.primary)

    @property
    def path(self) -> Path | None:
        return self.folder / "run_record.jsonl" if self.folder is not None else None

    def stat(self) -> tuple[int, int]:
        if not self.read_only:
            try:
                self.refresh()
            except OSError:
                raise
            except Exception as exc:  # the record boundary: this record fails, not the pass
                raise OSError(
                    errno.EIO,
                    f"cannot derive the record: {type(exc).__name__}: {exc}",
                    self.display,
                ) from exc
        elif self.path is not None and not self.path.exists():
            # nothing derived yet: the run directory exists, so the record is empty
            self.run_dir.listing()
            return 0, 0
        if self.path is None:
            return len(self._memory), 0
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def read_at(self, offset: int, length: int) -> bytes:
        if self.path is None:
            return self._memory[offset : offset + length]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        return self.run_dir.resolve_artifact(path, artifact_path)

    translations = 0  # run directories translated in this process (skips not counted)

    def refresh(self) -> Translation | None:
        """Append what changed in the run directory since the last refresh (if anything).

        A run directory whose files are unchanged since the last translation (same
        paths, sizes, mtimes; on S3 also ETags, per the ``source.json`` beside the
        derived record) is not read again, unless the translator asked to look again
        at a time now past (``Translation.recheck_at``).
        """
        with self._locked():
            fingerprint = self.run_dir.fingerprint()
            if self._unchanged(fingerprint):
                return None
            content = self._read()
            keep, seq, state = _lines_state(content)
            if keep != len(content):
                self._cut(keep, len(content))
            translation = self.translator.translate(
                self.run_dir, state, default_record_id(self._uri)
            )
            DerivedRecord.translations += 1
            self.last = translation
            appended = state is None or bool(translation.events or translation.new_problems)
            if appended:
                data = encode_events(batch_of(translation), seq + 1, int(time.time() * 1000))
                self._append(data)
            self._remember(fingerprint, translation.recheck_at)
            return translation if appended else None

    def _translator_key(self) -> str:
        """What else the translation depends on (a changed mapping translates again)."""
        t = self.translator
        if isinstance(t, SnapshotTranslator):
            return "snapshot:" + hashlib.sha256(t.mapping.model_dump_json().encode()).hexdigest()
        options = {k: v for k, v in vars(t).items() if isinstance(v, str | int | float | None)}
        return f"{type(t).__name__}:{json.dumps(options, sort_keys=True)}"

    @property
    def _source_path(self) -> Path | None:
        return self.folder / "source.json" if self.folder is not None else None

    def _unchanged(self, fingerprint: list[list[Any]]) -> bool:
        """The sources and the derived record are as the last translation left them."""
        if self._source_path is None or self.path is None:
            return False
        try:
            known = json.loads(self._source_path.read_bytes())
            size = os.stat(self.path).st_size
        except (OSError, ValueError):
            return False
        if not isinstance(known, dict) or known.get("derived_size") != size:
            return False
        if known.get("translator") != self._translator_key():
            return False
        recheck = known.get("recheck_at")
        if isinstance(recheck, int | float) and time.time() >= recheck:
            return False
        return bool(known.get("files") == fingerprint)

    def _remember(self, fingerprint: list[list[Any]], recheck_at: float | None) -> None:
        """Written after the derived record: a crash between the two only costs a
        translation that finds nothing new."""
        if self._source_path is None or self.path is None:
            return
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        body = {
            "files": fingerprint,
            "derived_size": size,
            "recheck_at": recheck_at,
            "translator": self._translator_key(),
        }
        tmp = self._source_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, separators=(",", ":")))
        os.replace(tmp, self._source_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.folder is None:
            yield
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> bytes:
        if self.path is None:
            return self._memory
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _cut(self, keep: int, size: int) -> None:
        log.warning(
            "derived_record_tail_cut",
            file=self.display,
            derived=str(self.path),
            kept=keep,
            cut=size - keep,
            reason="a batch was torn before its snapshot line (a crash mid-write)",
        )
        if self.path is None:
            self._memory = self._memory[:keep]
        else:
            os.truncate(self.path, keep)

    def _append(self, data: bytes) -> None:
        if self.path is None:
            self._memory += data
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = [
    "DerivedRecord",
    "LocalRunDir",
    "RunDir",
    "S3RunDir",
    "SnapshotTranslator",
    "Translator",
    "read_snapshot",
]
