"""Records on a local (or NFS) filesystem: discovery by glob and byte-range reads."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from syncd.artifacts import ResolvedArtifact, resolve_artifact
from syncd.record.events import RECORD_FILENAME

DEFAULT_PATTERN = f"**/{RECORD_FILENAME}"


class LocalRecord:
    """A record file on disk. Reads are positional, so a live writer is never disturbed."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def uri(self) -> str:
        return self.path.as_uri()

    @property
    def display(self) -> str:
        return str(self.path)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def stat(self) -> tuple[int, int]:
        """Size and mtime; an OSError naming the reason when this is not a readable file."""
        st = os.stat(self.path)
        _require_regular(self.path, st.st_mode)
        return st.st_size, st.st_mtime_ns

    def read_at(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            # O_NONBLOCK: a FIFO put in the record's place must not hang the open.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                _require_regular(self.path, os.fstat(fd).st_mode)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        return resolve_artifact(self.run_dir, path, artifact_path)


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else _KINDS.get(stat.S_IFMT(mode), "special")
        raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def find_records(root: Path, pattern: str = DEFAULT_PATTERN) -> Iterator[Path]:
    """Record files under ``root``, in a stable order.

    ``**/<name glob>`` (the common case) walks the tree once matching file names,
    which is much cheaper than a general glob on big trees. Symlinked folders are
    not followed (a loop cannot hang discovery) and a folder whose name matches is
    not a record. Any other matching name is, even when it cannot be read (a FIFO,
    a dangling or looping symlink, no permission): reading it reports why.
    """
    root = root.absolute()
    if root.is_file():
        yield root
        return
    head, sep, name_glob = pattern.rpartition("/")
    if head == "**" and sep and not any(ch in name_glob for ch in "/"):
        # os.walk sorts a symlink to a folder into dirnames and does not descend it.
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in sorted(filenames):
                if fnmatch.fnmatchcase(name, name_glob):
                    yield Path(dirpath) / name
        return
    # Path.glob does not descend symlinked folders in "**" either.
    yield from sorted(p for p in root.glob(pattern) if not _is_folder(p))


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def path_from_uri(uri: str) -> Path:
    """The local path of a ``file://`` URI made by ``Path.as_uri()``."""
    return Path(unquote(urlparse(uri).path))
