"""Structured logs: readable on a TTY, JSON lines otherwise; secrets never written.

structlog runs shared processors (level, timestamp, context, redaction) and
then a console or JSON renderer. Records from the standard library (MLflow,
alembic, botocore) go through the same chain, so a journal holds one format.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from syncd.redact import redact_text

__all__ = ["REDACTED", "configure", "redact", "redact_text"]

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


class _Stderr:
    """Write to whatever sys.stderr is now (a progress bar may redirect it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library logging for the whole process."""
    out: Any = stream or _Stderr()
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
    # Libraries speak only when something is wrong.
    for noisy in ("mlflow", "alembic", "botocore", "boto3", "urllib3", "watchdog", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
