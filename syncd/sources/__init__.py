"""Where records live. A source only finds records and reads their bytes; it never parses."""

from __future__ import annotations

from typing import Protocol

from syncd.artifacts import ResolvedArtifact


class RecordFile(Protocol):
    """One record as the engine sees it, wherever it is stored."""

    @property
    def uri(self) -> str:
        """Stable identity of the record's location (the ledger key, tag ``syncd.source``)."""
        ...

    @property
    def display(self) -> str:
        """What a user recognises in messages: a path or an s3:// URI."""
        ...

    def stat(self) -> tuple[int, int]:
        """(size in bytes, modification time in ns); FileNotFoundError when gone."""
        ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        """A confined, digested local copy of an artifact (ArtifactRefused when unsafe)."""
        ...


def etag_of(record: RecordFile) -> str | None:
    """The content tag the record's last ``stat()`` (or its listing) saw: an S3 object's
    ETag, kept in the ledger beside size and mtime. None for a source without one."""
    etag = getattr(record, "etag", None)
    return etag if isinstance(etag, str) else None


__all__ = ["RecordFile", "etag_of"]
