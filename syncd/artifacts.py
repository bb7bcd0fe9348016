"""Artifact files of a run directory: confinement and content digests.

An artifact event names a path relative to the run directory. Anything that
would leave it (``..``, an absolute path, a symlink pointing outside, also
inside a folder) is refused: a record must never make syncd upload
``/etc/shadow``. The digest of the content lets a replay skip an upload that
already happened.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class ArtifactRefused(ValueError):
    """The artifact path is unsafe or missing; the message says why."""


@dataclass(frozen=True, slots=True)
class ResolvedArtifact:
    """An artifact found inside the run directory, ready to upload."""

    key: str  # stable identity within the record: path and destination
    local_path: Path
    artifact_path: str | None
    is_dir: bool
    digest: str


def artifact_key(path: str, artifact_path: str | None) -> str:
    return f"{path} -> {artifact_path or '.'}"


def confine(run_dir: Path, relative: str) -> Path:
    """The real path of ``relative`` inside ``run_dir``, or ArtifactRefused."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute():
        raise ArtifactRefused(f"artifact path {relative!r} is absolute; it must be relative")
    if ".." in pure.parts:
        raise ArtifactRefused(f"artifact path {relative!r} leaves the run directory ('..')")
    root = run_dir.resolve()
    target = (root / pure).resolve()
    if not target.is_relative_to(root):
        raise ArtifactRefused(
            f"artifact path {relative!r} is a symlink pointing outside the run directory"
        )
    if not target.exists():
        raise ArtifactRefused(f"artifact path {relative!r} does not exist")
    if target.is_dir():
        for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
            for name in [*dirnames, *filenames]:
                entry = Path(dirpath) / name
                if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                    inside = entry.relative_to(root).as_posix()
                    raise ArtifactRefused(
                        f"artifact folder {relative!r} holds {inside!r}, a symlink pointing"
                        " outside the run directory"
                    )
    return target


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file digest) list."""
    if path.is_file():
        return _file_digest(path)
    listing = hashlib.sha256()
    for dirpath, _dirnames, filenames in sorted(os.walk(path)):
        for name in sorted(filenames):
            file = Path(dirpath) / name
            rel = file.relative_to(path).as_posix()
            listing.update(f"{rel}\0{_file_digest(file)}\n".encode())
    return listing.hexdigest()


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def resolve_artifact(run_dir: Path, path: str, artifact_path: str | None) -> ResolvedArtifact:
    if artifact_path is not None:
        dest = PurePosixPath(artifact_path)
        if dest.is_absolute() or ".." in dest.parts:
            raise ArtifactRefused(
                f"artifact_path {artifact_path!r} must be a folder inside the run's artifacts"
            )
    target = confine(run_dir, path)
    return ResolvedArtifact(
        key=artifact_key(path, artifact_path),
        local_path=target,
        artifact_path=artifact_path,
        is_dir=target.is_dir(),
        digest=content_digest(target),
    )
