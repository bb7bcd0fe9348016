"""Structured logs: readable on a TTY, JSON lines otherwise; secrets never written.

structlog runs shared processors (level, timestamp, context, redaction) and
then a console or JSON renderer. Records from the standard library (MLflow,
alembic, botocore) and Python warnings go through the same chain, so a journal
holds one format. A library's INFO is syncd's DEBUG: MLflow's "Creating initial
MLflow database tables" and alembic's "Context impl SQLiteImpl" show with
``--log-level debug`` (``-v``) only. While a progress bar owns the terminal,
lines are printed through its console, above it (:func:`logs_above`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from syncd.redact import redact_text

__all__ = ["REDACTED", "configure", "redact", "redact_text"]
if TYPE_CHECKING:
    from rich.console import Console

LEVELS = ("debug", "info", "warning", "error")
# Libraries whose INFO records are shown (as debug lines) at level debug.
_CHATTY_AT_DEBUG = ("mlflow", "alembic")
_NOISY = ("mlflow", "alembic", "botocore", "boto3", "urllib3", "watchdog", "sqlalchemy")
# Loggers MLflow gives handlers of their own (with propagate off) when it configures logging.
_MLFLOW_OWNED = ("mlflow", "alembic", "sqlalchemy.engine", "huey")

_SECRET_KEYS = re.compile(
    r"pass(word)?|secret|token|authorization|credential|api[_-]?key|session[_-]?key|signature",
    re.IGNORECASE,
)
REDACTED = "***"


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if _SECRET_KEYS.search(key) and key not in ("event",):
            return REDACTED
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    if _SECRET_KEYS.search(key) and value is not None:
        return REDACTED
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: scrub secrets from every key and value."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def shift_level(level: str, steps: int) -> str:
    """``level`` moved ``steps`` along debug < info < warning < error, clamped at both ends.

    ``-v`` is one step down, ``-q`` one step up: ``shift_level("info", quiet - verbose)``.
    """
    index = LEVELS.index(level.lower()) + steps
    return LEVELS[min(max(index, 0), len(LEVELS) - 1)]


def effective_level(
    configured: str, *, verbose: int = 0, quiet: int = 0, explicit: str | None = None
) -> str:
    """The log level a command runs at: an explicit ``--log-level`` wins over ``-v``/``-q``,
    which move the configured level (file, environment, else info)."""
    if explicit is not None:
        return explicit.lower()
    return shift_level(configured, quiet - verbose)


_live_console: Console | None = None


@contextmanager
def logs_above(console: Console) -> Iterator[None]:
    """While a live display (a progress bar) owns the terminal, print log lines through
    its console, so that each lands whole above the display instead of inside it."""
    global _live_console
    previous, _live_console = _live_console, console
    try:
        yield
    finally:
        _live_console = previous


class _Stderr:
    """Write to the live display's console if one runs, else to whatever sys.stderr is now."""

    def write(self, text: str) -> int:
        console = _live_console
        if console is None:
            return sys.stderr.write(text)
        from rich.text import Text

        console.print(Text.from_ansi(text.rstrip("\n")), soft_wrap=True, highlight=False)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _demote(threshold: int, events: Collection[str]) -> Any:
    """structlog processor: INFO from a library, or an event named in ``events``, is DEBUG
    (and dropped below the threshold)."""

    def demote(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
        if event_dict.get("level") == "info" and (
            event_dict.get("event") in events
            or not str(event_dict.get("logger", "")).startswith("syncd")
        ):
            if threshold > logging.DEBUG:
                raise structlog.DropEvent
            event_dict["level"] = "debug"
        return event_dict

    return demote


def _quiet_mlflow() -> None:
    """MLflow's output belongs to this chain: no handlers of its own, no run URLs on stdout.

    MLflow configures its loggers on import unless MLFLOW_CONFIGURE_LOGGING is false
    (mlflow/utils/logging_utils.py: a stderr handler, propagate off), and its client
    writes "View run ... at: URL" to stdout when a run on a tracking server ends
    (TrackingServiceClient._log_url) unless MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT is true.
    stdout is syncd's own: the summary or the --json document.
    """
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for name in _MLFLOW_OWNED:  # MLflow may have been imported (and configured) already
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    debug_events: Collection[str] = (),
) -> None:
    """Set up structlog and the standard library logging for the whole process.

    ``debug_events``: syncd events logged at info that are debug here (per-run lines
    in a backfill of thousands of records).
    """
    out: Any = stream or _Stderr()
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _demote(logging.getLevelName(level.upper()), frozenset(debug_events)),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Libraries speak only when something is wrong; at debug, MLflow and alembic tell
    # what they do (their INFO, rendered as debug).
    for noisy in _NOISY:
        quiet_at = logging.INFO if noisy in _CHATTY_AT_DEBUG else logging.WARNING
        logging.getLogger(noisy).setLevel(
            quiet_at if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
        )
    logging.captureWarnings(True)  # warnings.warn from libraries: a log line, not raw stderr
    _quiet_mlflow()
