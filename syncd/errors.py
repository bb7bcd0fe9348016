"""The one exception tree of syncd (stdlib only, importable on training hosts).

    SyncdError
     ├── ConfigError            bad flags, environment or config file (exit code 2)
     ├── RecordError            a bad line in a run record (path, line, seq, reason)
     │    └── UnsupportedVersion  a line with a format version this syncd does not know
     │         └── UnknownEventType  a line with an event type this syncd does not know
     ├── LedgerError            the ledger database cannot be opened or written
     ├── SourceError            a record source (an s3:// root) cannot be read now
     └── SinkError              MLflow (or its artifact store) refused or failed a write
          ├── TransientSinkError  worth retrying: unreachable, 5xx, "database is locked"
          │    └── ThrottledSinkError  429 Too Many Requests (with the server's Retry-After)
          └── PermanentSinkError  retrying cannot help: invalid value, deleted run
               └── SinkAccessDenied  credentials or the server's TLS certificate refused

Every failure a user can meet ends as one of these; the CLI turns them into a
one-line message and an exit code, never a traceback.
"""

from __future__ import annotations

from syncd.redact import redact_text


class SyncdError(Exception):
    """Root of every error syncd raises on purpose; its message never holds a secret.

    Messages end up in logs, the ledger, ``syncd status`` and summaries, and often
    quote a URI (with its password) or a record's values: they are redacted here.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class ConfigError(SyncdError):
    """Flags, environment or a config file are invalid; the message names the key."""


class RecordError(SyncdError):
    """A line of a run record that cannot be projected, with where and why."""

    def __init__(self, reason: str, *, path: str = "", line: int = 0, seq: int | None = None):
        self.reason = redact_text(reason)  # a reason may quote a record's values
        self.path = path
        self.line = line
        self.seq = seq
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"{self.path}:{self.line}" if self.path else f"line {self.line}"
        return f"{where}: {self.reason}"


class UnsupportedVersion(RecordError):
    """A line written in a newer format version: held back, never guessed at."""


class UnknownEventType(UnsupportedVersion):
    """A line of an event type this syncd does not know (not an ``x-`` type): held
    back like a newer version, since a newer writer may have meant it."""


class LedgerError(SyncdError):
    """The ledger (checkpoints, run map, sync events) failed."""


class SourceError(SyncdError):
    """Where records live cannot be read now (an S3 endpoint down, credentials expired
    or refused, a missing bucket): the record is not at fault and is read again later."""


class SinkError(SyncdError):
    """MLflow refused or failed a write."""


class TransientSinkError(SinkError):
    """A failure that may pass: unreachable server, 5xx, a locked SQLite database."""


class PermanentSinkError(SinkError):
    """A failure retrying cannot fix: an invalid value, a deleted run or experiment."""


class ThrottledSinkError(TransientSinkError):
    """The server asked to slow down (HTTP 429); ``retry_after`` is its Retry-After, if known."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class SinkAccessDenied(PermanentSinkError):
    """MLflow refused syncd's credentials (401, 403), or syncd refused the server's TLS
    certificate. Nothing about the record is wrong: no entry is ever reported as refused
    for it, the record waits as ``failed`` until the configuration is fixed."""
