"""The ``syncd`` command line: backfill, status, run.

Exit codes: 0 every record clean, 1 some record has errors (all else synced),
2 usage or configuration errors. No traceback reaches the user: errors end as
one line naming what to fix.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from syncd import __version__
from syncd.config import Root, Settings, load_config
from syncd.errors import ConfigError, SyncdError
from syncd.logging import configure, effective_level, logs_above, redact_text

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
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="What the roots hold: records (v1 run records), snapshot (needs --mapping),"
        " dvclive (DVCLive output folders) or tensorboard (TensorBoard event files).",
        show_default=False,
    ),
]
MappingOpt = Annotated[
    Path | None,
    typer.Option(
        "--mapping",
        help="Snapshot mapping file (YAML) for the roots; implies --format snapshot.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout.")]
LogFormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="auto, console or json.", show_default=False)
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="debug, info, warning or error (wins over -v/-q).", show_default=False
    ),
]
VerboseOpt = Annotated[
    int,
    typer.Option("--verbose", "-v", count=True, help="More log output; repeatable (-v: debug)."),
]
QuietOpt = Annotated[
    int,
    typer.Option(
        "--quiet", "-q", count=True, help="Less log output; repeatable (-q: warning, -qq: error)."
    ),
]
# Per-run lines: one per record in a backfill of thousands; shown with -v.
BACKFILL_DEBUG_EVENTS = ("run_created", "run_adopted")


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
    fmt: str | None = None,
    mapping: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Flag values as config overrides (flags the user did not give stay None: not set)."""
    root_extra: dict[str, Any] = {}
    if fmt:
        root_extra["format"] = fmt
    if mapping:
        root_extra["mapping"] = str(mapping)
        root_extra.setdefault("format", "snapshot")
    return {
        "roots": [{"path": r, **root_extra} for r in roots] if roots else None,
        "tracking_uri": tracking_uri,
        "state_dir": str(state_dir) if state_dir else None,
        "log.format": log_format,
        "log.level": log_level,
        **extra,
    }


def _verbosity(
    config: Path | None, overrides: dict[str, Any], verbose: int, quiet: int
) -> dict[str, Any]:
    """``overrides`` with ``log.level`` moved by -v/-q from the configured level.

    An explicit ``--log-level`` (already in ``overrides``) wins.
    """
    explicit = overrides.get("log.level")
    if explicit is not None or verbose == quiet:
        return overrides
    configured = load_config(config, overrides=overrides).log.level
    level = effective_level(configured, verbose=verbose, quiet=quiet, explicit=explicit)
    return {**overrides, "log.level": level}


def _settings(
    config: Path | None, overrides: dict[str, Any], debug_events: tuple[str, ...] = ()
) -> Settings:
    settings = load_config(config, overrides=overrides)
    configure(settings.log.format, settings.log.level, debug_events=debug_events)
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


def _short_path(path: str, width: int) -> str:
    """``path`` relative to the working directory when under it, its leading folders
    replaced by ``…/`` until it fits ``width``."""
    with suppress(ValueError):
        path = str(Path(path).relative_to(Path.cwd()))
    parts = Path(path).parts
    for start in range(1, len(parts)):
        if len(path) <= width:
            break
        path = str(Path("…", *parts[start:]))
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def _progress_bar(total: int) -> Any:
    """One bar on stderr: records done/total, events/s, ETA, the file last synced.

    Log lines are printed above it; so is anything a library writes to stdout or stderr
    while it is live (rich's redirection), so nothing lands inside the bar.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class EventRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.fields.get("events", 0) / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.0f} events/s", style="progress.data.speed")

    class Bar:
        def __init__(self, progress: Progress, task: Any) -> None:
            self.progress, self.task, self.events = progress, task, 0
            self.width = max(24, progress.console.width - 80)

        def advance(self, file: str, events: int) -> None:
            self.events += events
            self.progress.update(
                self.task, advance=1, events=self.events, file=_short_path(file, self.width)
            )

    @contextmanager
    def bar() -> Iterator[Bar]:
        console = Console(stderr=True)
        with (
            Progress(
                TextColumn("[bold]backfill"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("records"),
                EventRate(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[file]}", style="dim"),
                console=console,
                transient=False,
            ) as progress,
            logs_above(progress.console),
        ):
            task = progress.add_task("records", total=total, events=0, file="")
            yield Bar(progress, task)

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
    fmt: FormatOpt = None,
    mapping: MappingOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read and plan, write nothing (no MLflow, no ledger).")
    ] = False,
    upgrade_store: Annotated[
        bool,
        typer.Option(
            "--upgrade-store",
            help="Migrate an older SQLite MLflow store to this MLflow's schema (backup first).",
        ),
    ] = False,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
) -> None:
    """Sync every record under ROOT... once, then exit.

    Re-running is cheap: records unchanged since the last pass are skipped unread.
    """
    from syncd.backfill import backfill as run_backfill

    with _user_errors():
        overrides = _overrides(
            roots=roots,
            tracking_uri=tracking_uri,
            state_dir=state_dir,
            log_format=log_format,
            log_level=log_level,
            fmt=fmt,
            mapping=mapping,
        )
        settings = _settings(
            config, _verbosity(config, overrides, verbose, quiet), BACKFILL_DEBUG_EVENTS
        )
        if not settings.roots:
            raise ConfigError("no roots: give ROOT arguments or 'roots' in the config file")
        if pattern:
            settings.roots = [
                Root.model_validate({**r.model_dump(), "pattern": pattern}) for r in settings.roots
            ]
        summary = run_backfill(
            settings,
            dry_run=dry_run,
            progress=_progress_bar if sys.stderr.isatty() else None,
            upgrade_store=upgrade_store,
        )
        if json_out:
            typer.echo(json.dumps(summary.as_dict(), indent=2))
        else:
            _print_summary(summary.as_dict(), dry_run)
        if not summary.clean:
            raise typer.Exit(EXIT_RECORD_ERRORS)


def _print_summary(summary: dict[str, Any], dry_run: bool) -> None:
    """The summary table on stdout, then the errors grouped by file (``line N: reason``)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(
        title="backfill (dry run: nothing written)" if dry_run else "backfill",
        title_justify="left",
        show_header=False,
        box=box.SIMPLE,
    )
    table.add_column("what")
    table.add_column("count", justify="right", overflow="fold")
    rows = [
        ("records", "records"),
        ("clean", "synced"),
        ("unchanged", "unchanged"),
        ("with errors", "with_errors"),
        ("failed", "failed"),
        ("waiting", "waiting"),
        ("blocked", "blocked"),
        ("pending", "pending"),
        ("gone", "gone"),
        ("roots failed", "roots_failed"),
        ("events", "events"),
        ("metric points", "metric_points"),
        ("artifacts", "artifacts"),
    ]
    for label, key in rows:  # .get: counters another version of Summary may not have
        table.add_row(label, f"{summary.get(key, 0):,}")
    table.add_row("duration", f"{summary.get('duration_s', 0.0):.1f}s")
    table.add_row("sink", str(summary.get("tracking_uri", "")))
    console.print(table)

    by_file: dict[str, list[dict[str, Any]]] = {}
    for err in summary.get("errors", []):
        by_file.setdefault(str(err.get("file", "")), []).append(err)
    if by_file:
        console.print("errors:", style="bold red")
    for file, errors in by_file.items():
        console.print(Text(file), soft_wrap=True)
        for err in errors:
            where = f"line {err['line']}: " if err.get("line") else ""
            console.print(Text(f"  {where}{err.get('reason', '')}"), soft_wrap=True)
    if summary.get("aborted"):
        console.print(Text(f"stopped early: {summary['aborted']}"), soft_wrap=True, style="red")


@app.command("check-mapping")
def check_mapping(
    mapping: Annotated[Path, typer.Argument(help="The mapping file (YAML).", show_default=False)],
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory holding the snapshot files.", show_default=False)
    ],
) -> None:
    """Print the events RUN_DIR would produce under MAPPING (JSON lines), writing nothing.

    Mapping problems go to stderr, each naming the file, the field and the mapping
    entry; exit code 1 when there is any, 2 when the mapping itself is invalid.
    """
    from syncd.snapshot.derived import LocalRunDir, read_snapshot
    from syncd.snapshot.derived import default_record_id as default_id
    from syncd.snapshot.mapping import load_mapping
    from syncd.snapshot.translate import translate

    with _user_errors():
        parsed = load_mapping(mapping)
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} is not a folder")
        source = LocalRunDir(run_dir)
        try:
            snap = read_snapshot(source, parsed)
        except OSError as exc:
            raise ConfigError(f"{exc.filename or run_dir}: {exc.strerror or exc}") from exc
        result = translate(
            parsed, None, snap, default_record_id=default_id(source.uri_of(parsed.primary))
        )
        for event in result.events:
            typer.echo(json.dumps(event, separators=(",", ":"), sort_keys=False))
        for problem in result.problems:
            typer.echo(problem.describe(), err=True)
        if result.problems:
            raise typer.Exit(EXIT_RECORD_ERRORS)


@app.command("upload-spool")
def upload_spool(
    uri: Annotated[
        str,
        typer.Argument(
            help="s3://bucket/prefix (or the syncd:s3://bucket/prefix tracking URI).",
            show_default=False,
        ),
    ],
) -> None:
    """Upload what this host's spool of a syncd:s3:// tracking URI still holds, then exit.

    The spool is the one training processes use ($SYNCD_SPOOL_DIR, else the system
    temp folder, then <bucket>/<prefix>). Exit code 1 when S3 could not take it all:
    the spool keeps it for the next attempt.
    """
    from syncd.sources.s3 import split_uri
    from syncd.uri_upload import SpoolUploader, spool_dir

    with _user_errors():
        target = uri.removeprefix("syncd:")
        try:
            bucket, prefix = split_uri(target)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not bucket:
            raise ConfigError(f"{uri!r} names no bucket")
        folder = spool_dir(bucket, prefix)
        if not folder.is_dir():
            raise ConfigError(f"no spool for {target} at {folder}")
        try:
            count = SpoolUploader(folder, bucket, prefix).upload_pass()
        except Exception as exc:
            typer.echo(
                f"syncd: uploading {folder} to {target} failed: {type(exc).__name__}: {exc};"
                " the spool keeps it",
                err=True,
            )
            raise typer.Exit(EXIT_RECORD_ERRORS) from None
        typer.echo(f"uploaded {count} object(s) from {folder} to {target}")


@app.command()
def status(
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
) -> None:
    """Records per state, the last sync, and every record with errors."""
    from syncd.backfill import open_ledger, sink_key

    with _user_errors():
        overrides = _overrides(
            tracking_uri=tracking_uri,
            state_dir=state_dir,
            log_format=log_format,
            log_level=log_level,
        )
        settings = _settings(config, _verbosity(config, overrides, verbose, quiet))
        named = "tracking_uri" in settings.model_fields_set
        own_sink = sink_key(settings.tracking_uri)
        ledger = open_ledger(settings, read_only=True)
        reports: list[dict[str, Any]] = []
        if ledger is not None:
            try:
                sinks = [own_sink] if named else (ledger.sinks() or [own_sink])
                for sink in sinks:
                    view = ledger.view(sink)
                    one = view.summary()
                    one["recent"] = view.recent_events(10)
                    reports.append(one)
            finally:
                ledger.close()
        if not reports:
            reports.append(
                {
                    "sink": own_sink,
                    "records": {},
                    "last_sync_at": None,
                    "records_with_errors": [],
                    "recent": [],
                }
            )
        ledger_url = redact_text(settings.ledger_url_resolved)
        for one in reports:
            one["ledger"] = ledger_url
        # The first sink's fields at the top level (the shape of one sink), every sink
        # in "sinks".
        report: dict[str, Any] = {**reports[0], "sinks": reports}
        if json_out:
            typer.echo(json.dumps(report, indent=2, default=str))
        else:
            typer.echo("\n\n".join(_status_text(one) for one in reports))
        if any(one["records_with_errors"] for one in reports):
            raise typer.Exit(EXIT_RECORD_ERRORS)


def _when(epoch: float | None) -> str:
    import datetime as dt

    if not epoch:
        return "never"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _status_text(report: dict[str, Any]) -> str:
    when = _when(report["last_sync_at"])
    counts = ", ".join(f"{n} {state}" for state, n in report["records"].items() if n) or "none"
    lines = [
        f"sink:      {report['sink']}",
        f"ledger:    {report['ledger']}",
        f"records:   {counts}",
        f"last sync: {when}",
    ]
    for rec in report["records_with_errors"]:
        lines.append(f"{rec['state']}: {rec['source']}")
        if rec.get("reason"):
            retry = rec.get("next_attempt_at")
            lines.append(
                f"  {rec['reason']} (attempt {rec.get('attempts', 0)},"
                f" next try {_when(retry) if retry else 'on the next pass'})"
            )
        for err in rec["errors"]:
            lines.append(f"  line {err['line']}: {err['reason']}")
    return "\n".join(lines)


@app.command()
def resync(
    records: Annotated[
        list[str],
        typer.Argument(
            help="Record files or folders of records to project again from the start.",
            show_default=False,
        ),
    ],
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    fmt: FormatOpt = None,
    mapping: MappingOpt = None,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
) -> None:
    """Forget what the ledger knows of RECORD... for this sink and sync them again.

    For after an MLflow restore from a backup, or a mapping change: the same runs
    are kept (found by their syncd.record_id tag), lost points and artifacts come
    back, nothing is duplicated.
    """
    from syncd.backfill import backfill as run_backfill

    with _user_errors():
        overrides = _overrides(
            roots=records,
            tracking_uri=tracking_uri,
            state_dir=state_dir,
            log_format=log_format,
            log_level=log_level,
            fmt=fmt,
            mapping=mapping,
        )
        settings = _settings(config, _verbosity(config, overrides, verbose, quiet))
        summary = run_backfill(settings, resync=True)
        if json_out:
            typer.echo(json.dumps(summary.as_dict(), indent=2))
        else:
            _print_summary(summary.as_dict(), False)
        if not summary.clean:
            raise typer.Exit(EXIT_RECORD_ERRORS)


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
    fmt: FormatOpt = None,
    mapping: MappingOpt = None,
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
                fmt=fmt,
                mapping=mapping,
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
    fmt: FormatOpt = None,
    mapping: MappingOpt = None,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
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
            fmt=fmt,
            mapping=mapping,
            **{"watch.mode": "polling" if polling else None},
        )
        code = run_service(config, _verbosity(config, overrides, verbose, quiet))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
