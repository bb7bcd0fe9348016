"""The ``syncd`` command line: backfill, status, run.

Exit codes: 0 every record clean, 1 some record has errors (all else synced),
2 usage or configuration errors. No traceback reaches the user: errors end as
one line naming what to fix.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from syncd import __version__
from syncd.config import Root, Settings, load_config
from syncd.errors import ConfigError, SyncdError
from syncd.logging import configure, redact_text

EXIT_OK, EXIT_RECORD_ERRORS, EXIT_USAGE = 0, 1, 2

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mirror run records (JSONL event logs written by training code) into MLflow.",
)
log = structlog.get_logger("syncd.cli")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file.", show_default=False)
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]",
        show_default=False,
    ),
]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Ledger folder [default: $SYNCD_STATE_DIR, else ./.syncd]",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout.")]
LogFormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="auto, console or json.", show_default=False)
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help="debug, info, warning or error.", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"syncd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Mirror run records into MLflow, idempotently."""


def _overrides(
    *,
    roots: list[str] | None = None,
    tracking_uri: str | None = None,
    state_dir: Path | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Flag values as config overrides (flags the user did not give stay None: not set)."""
    return {
        "roots": [{"path": r} for r in roots] if roots else None,
        "tracking_uri": tracking_uri,
        "state_dir": str(state_dir) if state_dir else None,
        "log.format": log_format,
        "log.level": log_level,
        **extra,
    }


def _settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    settings = load_config(config, overrides=overrides)
    configure(settings.log.format, settings.log.level)
    return settings


@contextmanager
def _user_errors() -> Iterator[None]:
    """SyncdError -> one line on stderr and the exit code; a bug -> no traceback either."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"syncd: configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except SyncdError as exc:
        typer.echo(f"syncd: {redact_text(str(exc))}", err=True)
        raise typer.Exit(EXIT_RECORD_ERRORS) from None
    except KeyboardInterrupt:
        typer.echo("syncd: interrupted", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        structlog.get_logger("syncd").debug("internal_error", exc_info=True)
        typer.echo(
            f"syncd: internal error: {type(exc).__name__}: {redact_text(str(exc))}"
            " (run with --log-level debug for details)",
            err=True,
        )
        raise typer.Exit(EXIT_RECORD_ERRORS) from None


def _progress_bar(total: int) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    @contextmanager
    def bar() -> Iterator[Callable[[], None]]:
        with Progress(
            TextColumn("[bold]backfill"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task("records", total=total)
            yield lambda: progress.advance(task)

    return bar()


@app.command()
def backfill(
    roots: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders to scan for run records (default: the config's roots).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    pattern: Annotated[
        str | None,
        typer.Option("--pattern", help="Glob of record files under each root.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read and plan, write nothing (no MLflow, no ledger).")
    ] = False,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Sync every record under ROOT... once, then exit.

    Re-running is cheap: records unchanged since the last pass are skipped unread.
    """
    from syncd.backfill import backfill as run_backfill

    with _user_errors():
        settings = _settings(
            config,
            _overrides(
                roots=roots,
                tracking_uri=tracking_uri,
                state_dir=state_dir,
                log_format=log_format,
                log_level=log_level,
            ),
        )
        if not settings.roots:
            raise ConfigError("no roots: give ROOT arguments or 'roots' in the config file")
        if pattern:
            settings.roots = [
                Root(path=r.path, pattern=pattern, experiment=r.experiment) for r in settings.roots
            ]
        show_bar = not json_out and sys.stderr.isatty()
        summary = run_backfill(
            settings, dry_run=dry_run, progress=_progress_bar if show_bar else None
        )
        if json_out:
            typer.echo(json.dumps(summary.as_dict(), indent=2))
        else:
            _print_summary(summary, dry_run)
        if not summary.clean:
            raise typer.Exit(EXIT_RECORD_ERRORS)


def _print_summary(summary: Any, dry_run: bool) -> None:
    verb = "would sync" if dry_run else "synced"
    lines = [
        f"{summary.records} records: {summary.synced} clean, {summary.unchanged} unchanged,"
        f" {summary.with_errors} with errors, {summary.failed} failed, {summary.blocked} blocked,"
        f" {summary.pending} pending",
        f"{verb} {summary.events} events, {summary.metric_points} metric points,"
        f" {summary.artifacts} artifacts in {summary.duration_s:.1f}s -> {summary.tracking_uri}",
    ]
    for err in summary.errors:
        where = f"{err['file']}:{err['line']}" if err["line"] else err["file"]
        lines.append(f"  error: {where}: {err['reason']}")
    if summary.aborted:
        lines.append(f"  stopped early: {summary.aborted}")
    typer.echo("\n".join(lines))


@app.command()
def status(
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Records per state, the last sync, and every record with errors."""
    from syncd.backfill import open_ledger

    with _user_errors():
        settings = _settings(
            config,
            _overrides(
                tracking_uri=tracking_uri,
                state_dir=state_dir,
                log_format=log_format,
                log_level=log_level,
            ),
        )
        ledger = open_ledger(settings, read_only=True)
        if ledger is None:
            report: dict[str, Any] = {
                "sink": redact_text(settings.tracking_uri),
                "records": {},
                "last_sync_at": None,
                "records_with_errors": [],
                "recent": [],
            }
        else:
            try:
                report = ledger.summary()
                report["recent"] = ledger.recent_events(10)
            finally:
                ledger.close()
        report["ledger"] = redact_text(settings.ledger_url_resolved)
        if json_out:
            typer.echo(json.dumps(report, indent=2, default=str))
        else:
            _print_status(report)
        if report["records_with_errors"]:
            raise typer.Exit(EXIT_RECORD_ERRORS)


def _print_status(report: dict[str, Any]) -> None:
    import datetime as dt

    last = report["last_sync_at"]
    when = (
        dt.datetime.fromtimestamp(last, dt.UTC).isoformat(timespec="seconds") if last else "never"
    )
    counts = ", ".join(f"{n} {state}" for state, n in report["records"].items() if n) or "none"
    lines = [
        f"sink:      {report['sink']}",
        f"ledger:    {report['ledger']}",
        f"records:   {counts}",
        f"last sync: {when}",
    ]
    for rec in report["records_with_errors"]:
        lines.append(f"{rec['state']}: {rec['source']}")
        for err in rec["errors"]:
            lines.append(f"  line {err['line']}: {err['reason']}")
    typer.echo("\n".join(lines))


@app.command()
def verify(
    roots: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders holding the run records (default: the config's roots).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Compare every record under ROOT... with its MLflow run; print the differences.

    Reads only: writes neither MLflow nor the ledger. Exit 0 when the mirror is
    complete, 1 on any difference.
    """
    from syncd.verify import verify_records

    with _user_errors():
        settings = _settings(
            config,
            _overrides(
                roots=roots,
                tracking_uri=tracking_uri,
                state_dir=state_dir,
                log_format=log_format,
                log_level=log_level,
            ),
        )
        totals, results = verify_records(settings)
        differing: list[dict[str, Any]] = []
        for result in results:
            if not result.differences:
                continue
            if json_out:
                differing.append(result.as_dict())
            else:
                typer.echo("\n".join(d.text(result.file) for d in result.differences))
        if json_out:
            typer.echo(json.dumps({**totals.as_dict(), "results": differing}, indent=2))
        else:
            typer.echo(totals.line())
        if not totals.ok:
            raise typer.Exit(EXIT_RECORD_ERRORS)


@app.command()
def run(
    roots: Annotated[
        list[str] | None,
        typer.Argument(help="Folders to watch (default: the config's roots).", show_default=False),
    ] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    health_addr: Annotated[
        str | None,
        typer.Option(
            "--health-addr",
            help="HOST:PORT for /healthz, /readyz, /metrics [default: 127.0.0.1:9464]; 'off'.",
            show_default=False,
        ),
    ] = None,
    polling: Annotated[
        bool,
        typer.Option("--polling", help="Poll instead of inotify (NFS and similar filesystems)."),
    ] = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Follow the roots and keep MLflow within a second of the records (the service).

    SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file.
    """
    from syncd.service import run_service

    with _user_errors():
        overrides = _overrides(
            roots=roots,
            tracking_uri=tracking_uri,
            state_dir=state_dir,
            log_format=log_format,
            log_level=log_level,
            health_addr=health_addr,
            **{"watch.mode": "polling" if polling else None},
        )
        code = run_service(config, overrides)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
