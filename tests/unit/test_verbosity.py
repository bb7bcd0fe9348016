"""-v/-q and --log-level; where MLflow's own output goes; log lines above a live display."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from syncd.logging import configure, effective_level, logs_above, shift_level


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() changes process-wide logging and MLflow's switches: put them back."""
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.delenv("MLFLOW_CONFIGURE_LOGGING", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
        structlog.reset_defaults()


@pytest.mark.parametrize(
    ("configured", "verbose", "quiet", "expected"),
    [
        ("info", 0, 0, "info"),
        ("info", 1, 0, "debug"),
        ("info", 3, 0, "debug"),  # clamped
        ("info", 0, 1, "warning"),
        ("info", 0, 2, "error"),
        ("info", 0, 5, "error"),  # clamped
        ("info", 2, 1, "debug"),  # -vv -q: one step down
        ("info", 1, 1, "info"),
        ("warning", 1, 0, "info"),  # moves from the configured level
        ("ERROR", 2, 0, "info"),
        ("debug", 0, 1, "info"),
    ],
)
def test_verbose_and_quiet_move_the_configured_level(
    configured: str, verbose: int, quiet: int, expected: str
) -> None:
    assert effective_level(configured, verbose=verbose, quiet=quiet) == expected


@pytest.mark.parametrize(("verbose", "quiet"), [(0, 0), (2, 0), (0, 2)])
def test_an_explicit_log_level_wins(verbose: int, quiet: int) -> None:
    assert effective_level("info", verbose=verbose, quiet=quiet, explicit="WARNING") == "warning"


def test_shift_level_rejects_an_unknown_level() -> None:
    with pytest.raises(ValueError):
        shift_level("verbose", 1)


def events(stream: io.StringIO) -> list[tuple[str, str]]:
    return [(e["event"], e["level"]) for e in map(json.loads, stream.getvalue().splitlines())]


def test_per_run_events_and_library_info_are_debug(restore_logging: None) -> None:
    for level, expected in [
        ("info", [("backfill_start", "info")]),
        (
            "debug",
            [
                ("backfill_start", "info"),
                ("run_created", "debug"),
                ("Creating initial MLflow database tables...", "debug"),
            ],
        ),
    ]:
        stream = io.StringIO()
        configure(fmt="json", level=level, stream=stream, debug_events=("run_created",))
        structlog.get_logger("syncd.backfill").info("backfill_start")
        structlog.get_logger("syncd.sink").info("run_created", run_id="r1")
        logging.getLogger("mlflow.store.db.utils").info(
            "Creating initial MLflow database tables..."
        )
        assert events(stream) == expected, level


def test_mlflow_configured_loggers_are_taken_back_into_the_chain(restore_logging: None) -> None:
    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    _configure_mlflow_loggers("mlflow")  # what importing MLflow does unless told not to
    stream = io.StringIO()
    configure(fmt="json", level="debug", stream=stream)
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    assert events(stream) == [("Context impl SQLiteImpl.", "debug")]
    assert not logging.getLogger("mlflow").handlers


def test_mlflow_does_not_print_run_urls_on_stdout(restore_logging: None) -> None:
    from mlflow.environment_variables import (
        MLFLOW_CONFIGURE_LOGGING,
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    )

    assert not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    configure(fmt="json", stream=io.StringIO())
    # "🏃 View run ... at: ..." (TrackingServiceClient._log_url) checks this switch
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    assert not MLFLOW_CONFIGURE_LOGGING.get()


def test_python_warnings_are_log_lines(restore_logging: None) -> None:
    import warnings

    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", FutureWarning, stacklevel=1)
    [(event, level)] = events(stream)
    assert "FutureWarning: old API" in event and level == "warning"


def test_log_lines_go_through_the_live_console(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=60)
    configure(fmt="json")  # to stderr
    log = structlog.get_logger("syncd.test")
    with logs_above(console):
        log.info("above_the_bar", file="/a/very/long/path/" + "x" * 80)
    log.info("after_the_bar")
    [above] = screen.getvalue().splitlines()  # one line: not wrapped at the console's width
    assert json.loads(above)["event"] == "above_the_bar"
    assert [json.loads(row)["event"] for row in capsys.readouterr().err.splitlines()] == [
        "after_the_bar"
    ]
