"""An in-memory record source: the ``RecordFile`` contract without a disk or a network.

``MemorySource`` holds objects by relative key (like an S3 prefix); its records
read the current bytes (like a local file: a write is seen by the next read),
report ``FileNotFoundError`` once deleted, resolve artifacts under the record's
"folder" with the same confinement as the real sources, and stage them into a
private temp folder. Hooks let a test act between two calls of the engine
(``on_read``: delete or rewrite an object while it is being read).
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from syncd.artifacts import (
    STAGE_PREFIX,
    ArtifactRefused,
    ResolvedArtifact,
    artifact_key,
    check_artifact_path,
)
from syncd.sources.s3 import confine_key, glob_regex


class MemorySource:
    """Objects in a dict; ``mem://<name>/<key>`` URIs."""

    def __init__(self, name: str = "mem") -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}
        self.marks: dict[str, int] = {}
        self._writes = 0
        self.on_read: Callable[[MemoryRecord, int, int], None] | None = None

    def write(self, rel: str, data: bytes) -> None:
        self._writes += 1
        self.objects[rel] = bytes(data)
        self.marks[rel] = self._writes  # every write moves the change mark

    def append(self, rel: str, data: bytes) -> None:
        self.write(rel, self.objects.get(rel, b"") + data)

    def delete(self, rel: str) -> None:
        del self.objects[rel]
        del self.marks[rel]

    def move(self, rel: str, to: str) -> None:
        self.write(to, self.objects[rel])
        self.delete(rel)

    def discover(self, pattern: str = "**/run_record.jsonl") -> list[str]:
        regex = glob_regex(pattern)
        return sorted(key for key in self.objects if regex.fullmatch(key))

    def uri(self, rel: str) -> str:
        return f"mem://{self.name}/{rel}"

    def record(self, rel: str) -> MemoryRecord:
        return MemoryRecord(self, rel)

    def locate(self, uri: str) -> MemoryRecord | None:
        """For ``Engine(locate=...)``: the record at one of this source's URIs."""
        prefix = f"mem://{self.name}/"
        return self.record(uri[len(prefix) :]) if uri.startswith(prefix) else None


class MemoryRecord:
    """One record of a :class:`MemorySource` (the ``RecordFile`` protocol)."""

    def __init__(self, source: MemorySource, key: str) -> None:
        self.source = source
        self.key = key

    @property
    def uri(self) -> str:
        return self.source.uri(self.key)

    @property
    def display(self) -> str:
        return self.uri

    def _data(self) -> bytes:
        data = self.source.objects.get(self.key)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.uri)
        return data

    def stat(self) -> tuple[int, int]:
        return len(self._data()), self.source.marks[self.key]

    def read_at(self, offset: int, length: int) -> bytes:
        if self.source.on_read is not None:
            self.source.on_read(self, offset, length)
        return self._data()[offset : offset + max(0, length)]

    def close(self) -> None:
        pass

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        check_artifact_path(artifact_path)
        prefix = self.key.rpartition("/")[0]
        key = confine_key(prefix, path.rstrip("/") if path not in ("/", "") else path)
        objects = self.source.objects
        if not path.endswith("/") and key in objects:
            files = {"": objects[key]}
        else:
            base = f"{key}/" if key else ""
            files = {k[len(base) :]: v for k, v in objects.items() if k.startswith(base)}
            if any(part in ("", ".", "..") for rel in files for part in rel.split("/")):
                raise ArtifactRefused(f"artifact folder {path!r} holds a key that is not plain")
            if not files:
                raise ArtifactRefused(f"artifact path {path!r} does not exist")
        is_dir = "" not in files
        name = PurePosixPath(key).name or "artifacts"
        snapshot = dict(sorted(files.items()))
        return ResolvedArtifact(
            key=artifact_key(path, artifact_path),
            local_path=Path(name),
            artifact_path=artifact_path,
            is_dir=is_dir,
            digest=_digest(snapshot),
            relative=path,
            size=sum(len(v) for v in snapshot.values()),
            stage=lambda area: _stage(name, snapshot, area),
        )


def _digest(files: dict[str, bytes]) -> str:
    listing = hashlib.sha256()
    for rel, data in files.items():
        listing.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return listing.hexdigest()


@contextmanager
def _stage(name: str, files: dict[str, bytes], area: Path | None) -> Iterator[tuple[Path, str]]:
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}mem-", dir=area))
    try:
        dest = stage / name
        if "" in files:
            dest.write_bytes(files[""])
        else:
            for rel, data in files.items():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(data)
        yield dest, _digest(files)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
