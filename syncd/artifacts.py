"""Artifact files of a run directory: confinement and content digests.

An artifact event names a path relative to the run directory. Anything that
would leave it (``..``, an absolute path, a symlink pointing outside, also
inside a folder) is refused: a record must never make syncd upload
``/etc/shadow``. The digest of the content lets a replay skip an upload that
already happened.

Checking a path and then uploading it is a race: a symlink or a hard link to
an outside file could be put in its place in between. So the upload never
reads the checked path again by name: :func:`staged` re-checks, opens each
file with ``O_NOFOLLOW``, refuses hard links that lead outside the run
directory, and copies exactly the opened bytes into a private staging folder,
which is what MLflow uploads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from syncd.pids import alive


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
    root: Path | None = None  # the run directory's real path (for staging)
    relative: str = ""  # the path as the record names it
    line: int = 0  # the artifact event's line and seq, for reports
    seq: int | None = None
    size: int | None = None  # bytes to upload, when known without looking at local_path
    # A source whose artifacts are not local files (S3) stages them itself:
    # stage(area) yields (local copy to upload, digest of exactly those bytes).
    stage: Callable[[Path | None], AbstractContextManager[tuple[Path, str]]] | None = field(
        default=None, compare=False
    )


def artifact_key(path: str, artifact_path: str | None) -> str:
    return f"{path} -> {artifact_path or '.'}"


def confine(run_dir: Path, relative: str) -> Path:
    """The real path of ``relative`` inside ``run_dir``, or ArtifactRefused.

    Only regular files and folders of them are artifacts: a FIFO (opening it would
    block), a device, a socket or a symlink loop is refused, also inside a folder.
    """
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute():
        raise ArtifactRefused(f"artifact path {relative!r} is absolute; it must be relative")
    if ".." in pure.parts:
        raise ArtifactRefused(f"artifact path {relative!r} leaves the run directory ('..')")
    root = _real(run_dir, "the run directory", relative)
    target = _real(root / pure, f"artifact path {relative!r}", relative)
    if not target.is_relative_to(root):
        raise ArtifactRefused(
            f"artifact path {relative!r} is a symlink pointing outside the run directory"
        )
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise ArtifactRefused(f"artifact path {relative!r} does not exist") from None
    except OSError as exc:
        raise ArtifactRefused(f"artifact path {relative!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        folder_files(root, target, relative)
    elif not stat.S_ISREG(mode):
        raise ArtifactRefused(
            f"artifact path {relative!r} is {_kind(mode)}, not a regular file or folder"
        )
    return target


def _real(path: Path, what: str, relative: str) -> Path:
    """``path`` with every symlink resolved; a loop or an unreadable link is refused."""
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise ArtifactRefused(f"{what} is a symlink loop") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactRefused(f"{what} is a symlink loop") from None
        raise ArtifactRefused(f"{what} cannot be resolved: {exc.strerror or exc}") from None


def folder_files(root: Path, folder: Path, relative: str) -> list[tuple[str, Path]]:
    """Every file of an artifact folder as (path inside the folder, real path), sorted.

    Symlinked sub-folders are followed (an upload follows them too), so each entry
    is checked wherever it leads: outside the run directory, a loop back to a folder
    above it, or anything but a regular file or folder refuses the whole folder.
    """
    files: list[tuple[str, Path]] = []
    stack: list[tuple[Path, PurePosixPath, frozenset[Path]]] = [
        (folder, PurePosixPath(), frozenset({folder}))
    ]
    while stack:
        real_dir, rel_dir, above = stack.pop()
        try:
            with os.scandir(real_dir) as it:
                names = sorted(entry.name for entry in it)
        except OSError as exc:
            shown = (PurePosixPath(relative) / rel_dir).as_posix()
            raise ArtifactRefused(
                f"artifact folder {shown!r} cannot be listed: {exc.strerror or exc}"
            ) from None
        for name in names:
            inside = (PurePosixPath(relative) / rel_dir / name).as_posix()

            def refuse(why: str, inside: str = inside) -> ArtifactRefused:
                return ArtifactRefused(f"artifact folder {relative!r} holds {inside!r}, {why}")

            entry = real_dir / name
            try:
                real = entry.resolve() if entry.is_symlink() else entry
            except RuntimeError:  # Python < 3.13: a symlink loop
                raise refuse("a symlink loop") from None
            except OSError as exc:
                why = "a symlink loop" if exc.errno == errno.ELOOP else str(exc.strerror or exc)
                raise refuse(why) from None
            if not real.is_relative_to(root):
                raise refuse("a symlink pointing outside the run directory")
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:
                raise refuse("a symlink to nothing") from None
            except OSError as exc:
                raise refuse(str(exc.strerror or exc)) from None
            if stat.S_ISDIR(mode):
                if real in above:
                    raise refuse("a symlink loop (it leads back to a folder above it)")
                stack.append((real, rel_dir / name, above | {real}))
            elif stat.S_ISREG(mode):
                files.append(((rel_dir / name).as_posix(), real))
            else:
                raise refuse(f"{_kind(mode)}, not a regular file")
    return sorted(files)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file digest) list."""
    if not path.is_dir():
        return _file_digest(path)
    real = path.resolve()
    return _listing_digest(folder_files(real, real, "."))


def _listing_digest(files: list[tuple[str, Path]]) -> str:
    listing = hashlib.sha256()
    for rel, file in files:
        listing.update(f"{rel}\0{_file_digest(file)}\n".encode())
    return listing.hexdigest()


def _file_digest(path: Path) -> str:
    # O_NONBLOCK: a file swapped for a FIFO after confine() must not hang the open.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactRefused(f"{path.name!r} is {_kind(mode)}, not a regular file")
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- staging: upload exactly the bytes that were checked ------------------------------

STAGE_PREFIX = "syncd-stage-"
_CHUNK = 1024 * 1024


def _open_checked(root: Path, real: Path, shown: str) -> int:
    """Open ``real`` (inside ``root``) without following a symlink swapped in since the
    check; refuse anything but a regular file, and hard links that lead outside."""
    if not real.is_relative_to(root):
        raise ArtifactRefused(f"artifact path {shown!r} now points outside the run directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactRefused(
                f"artifact path {shown!r} became a symlink after it was checked"
            ) from None
        raise ArtifactRefused(f"artifact path {shown!r}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactRefused(f"artifact path {shown!r} is {_kind(st.st_mode)}")
        if st.st_nlink > 1 and _links_inside(root, st) < st.st_nlink:
            raise ArtifactRefused(
                f"artifact path {shown!r} is a hard link to a file outside the run directory"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _links_inside(root: Path, st: os.stat_result) -> int:
    """How many names of the file (device, inode) live under ``root``."""
    count = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                other = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                count += 1
    return count


def _copy_fd(fd: int, dest: Path, digest: Any) -> None:
    with os.fdopen(fd, "rb") as src, dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)


@contextmanager
def staged(upload: ResolvedArtifact, area: Path | None = None) -> Iterator[tuple[Path, str]]:
    """A private copy of the artifact, made from files opened after a fresh check.

    Yields (path to upload, digest of exactly those bytes). The copy keeps the
    file or folder name MLflow uses, and is removed afterwards, also on errors.
    """
    if upload.stage is not None:
        with upload.stage(area) as copy:
            yield copy
        return
    root = upload.root or upload.local_path.parent
    shown = upload.relative or upload.local_path.name
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=area))
    try:
        if upload.is_dir:
            target = confine(root, upload.relative) if upload.relative else upload.local_path
            dest_root = stage / target.name
            dest_root.mkdir()
            listing = hashlib.sha256()
            for rel, real in folder_files(root, target, shown):
                fd = _open_checked(root, real, f"{shown}/{rel}")
                dest = dest_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                file_digest = hashlib.sha256()
                _copy_fd(fd, dest, file_digest)
                listing.update(f"{rel}\0{file_digest.hexdigest()}\n".encode())
            yield dest_root, listing.hexdigest()
        else:
            real = confine(root, upload.relative) if upload.relative else upload.local_path
            fd = _open_checked(root, real, shown)
            dest = stage / real.name
            digest = hashlib.sha256()
            _copy_fd(fd, dest, digest)
            yield dest, digest.hexdigest()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def clean_stale_stages(area: Path | None = None) -> int:
    """Remove staging folders left by processes that died (a SIGKILL mid-upload).

    Best effort: a temporary folder that cannot be listed (or a full disk, which
    makes ``tempfile`` find no usable folder) is left for the next start.
    """
    try:
        base = Path(area or tempfile.gettempdir())
        folders = list(base.glob(f"{STAGE_PREFIX}*"))
    except OSError:
        return 0
    removed = 0
    for folder in folders:
        pid = folder.name[len(STAGE_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def check_artifact_path(artifact_path: str | None) -> None:
    """The destination must be a folder inside the run's artifacts (ArtifactRefused if not)."""
    if artifact_path is not None:
        dest = PurePosixPath(artifact_path)
        if dest.is_absolute() or ".." in dest.parts:
            raise ArtifactRefused(
                f"artifact_path {artifact_path!r} must be a folder inside the run's artifacts"
            )


def resolve_artifact(run_dir: Path, path: str, artifact_path: str | None) -> ResolvedArtifact:
    check_artifact_path(artifact_path)
    target = confine(run_dir, path)
    is_dir = target.is_dir()
    if is_dir:
        digest = _listing_digest(folder_files(run_dir.resolve(), target, path))
    else:
        digest = _file_digest(target)
    return ResolvedArtifact(
        key=artifact_key(path, artifact_path),
        local_path=target,
        artifact_path=artifact_path,
        is_dir=is_dir,
        digest=digest,
        root=run_dir.resolve(),
        relative=path,
    )
