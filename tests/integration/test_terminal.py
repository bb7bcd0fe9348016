"""What an operator sees of `syncd backfill`: on a terminal (a real pseudo-terminal, rendered
as a screen) and in a pipe (JSON lines on stderr, the --json document on stdout)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from daemon_helpers import SYNCD
from helpers import EXAMPLES, line, started, write_record

COLUMNS = 120
BAR = "━"  # rich's bar glyph: on screen, only the progress bar uses it
NOISE = ("Creating initial MLflow database tables", "Context impl SQLiteImpl", "View run")
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the suite's SYNCD_*/MLFLOW_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_"))}
    for key in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(key, None)
    env.update(COLUMNS=str(COLUMNS), LINES="60", TERM="xterm-256color")
    return env


def run_in_terminal(*args: str, cwd: Path, timeout: float = 180) -> tuple[int, str]:
    """Run the console script with stdin, stdout and stderr on a pseudo-terminal; read
    everything it writes until it exits (EOF on the terminal), within ``timeout``."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        [SYNCD, *args], cwd=cwd, env=user_env(), stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"syncd {' '.join(args)} still running after {timeout}s")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every writer closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def render(raw: str, columns: int = COLUMNS) -> list[str]:
    """The screen a terminal shows after ``raw``: text, cursor moves and line erasures
    (what rich's live display uses); colours and other controls are ignored."""
    rows: list[list[str]] = [[]]
    r = c = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = CSI.match(raw, i)
            if m is None:
                i += 1
                continue
            params, cmd = m.group(1), m.group(2)
            n = int(params) if params.isdigit() else None
            if cmd == "A":
                r = max(0, r - (n or 1))
            elif cmd == "B":
                r += n or 1
            elif cmd == "C":
                c += n or 1
            elif cmd == "D":
                c = max(0, c - (n or 1))
            elif cmd == "G":
                c = (n or 1) - 1
            elif cmd == "K":
                while len(rows) <= r:
                    rows.append([])
                if n in (None, 0):
                    del rows[r][c:]
                elif n == 1:
                    rows[r][: c + 1] = [" "] * min(c + 1, len(rows[r]))
                else:
                    rows[r] = []
            i = m.end()
            continue
        if ch == "\r":
            c = 0
        elif ch == "\n":
            r += 1
        elif ch >= " ":
            if c >= columns:  # auto-wrap
                r, c = r + 1, 0
            while len(rows) <= r:
                rows.append([])
            row = rows[r]
            row.extend(" " * (c + 1 - len(row)))
            row[c] = ch
            c += 1
        while len(rows) <= r:
            rows.append([])
        i += 1
    return ["".join(row).rstrip() for row in rows]


def plain(raw: str) -> str:
    return CSI.sub("", raw)


@pytest.fixture
def runs(workdir: Path) -> Path:
    """The example runs plus one record with two bad lines and one with a bad last line."""
    root = workdir / "runs"
    shutil.copytree(EXAMPLES, root)
    write_record(root / "bad", [started("bad1"), "{oops\n", "[1, 2]\n"])
    write_record(root / "worse", [started("bad2"), line(1, "metrics", metrics={"a": 1}), "{\n"])
    return root


def log_lines(screen: list[str]) -> list[str]:
    return [row for row in screen if re.search(r"\[(debug|info|warning|error)\s*\]", row)]


def test_terminal_shows_one_bar_then_the_summary_and_errors_by_file(
    workdir: Path, runs: Path
) -> None:
    # A store that does not exist yet: MLflow creates its tables (and says so) during the pass.
    code, raw = run_in_terminal(
        "backfill", "runs", "--tracking-uri", f"sqlite:///{workdir / 'fresh.db'}", cwd=workdir
    )
    screen = render(raw)
    text = "\n".join(screen)
    assert code == 1, text

    bars = [row for row in screen if BAR in row]
    assert len(bars) == 1, text  # one bar, drawn in place: no stale frames left on screen
    [bar] = bars
    assert re.search(r"\bbackfill\b.*\b9/9 records\b.*\d[\d,]* events/s", bar), bar
    assert "run_record.jsonl" in bar  # the file last synced, shortened

    for noise in (*NOISE, "run_created", "run_adopted"):
        assert noise not in plain(raw), noise
    logs = log_lines(screen)
    assert any("backfill_start" in row for row in logs), text
    assert any("record_error" in row and "[warning" in row for row in logs), text
    for row in logs:  # printed above the bar, never inside it
        assert BAR not in row and "records" not in row.split("]")[0]
    assert screen.index(next(r for r in logs if "backfill_start" in r)) < screen.index(bar)

    after = screen[screen.index(bar) + 1 :]
    table = "\n".join(after)
    for label, value in [
        ("records", "9"),
        ("clean", "7"),
        ("unchanged", "0"),
        ("with errors", "2"),
        ("failed", "0"),
        ("waiting", r"\d+"),
        ("blocked", "0"),
        ("pending", r"\d+"),
        ("gone", "0"),
        ("artifacts", "7"),
    ]:
        assert re.search(rf"^\s*{label}\s+{value}\s*$", table, re.M), (label, table)
    for label in ("events", "metric points", "duration", "sink"):
        assert re.search(rf"^\s*{label}\s+\S", table, re.M), (label, table)

    errors = after[[row.strip() for row in after].index("errors:") + 1 :]
    bad, worse = str(runs / "bad" / "run_record.jsonl"), str(runs / "worse" / "run_record.jsonl")
    files = [row for row in errors if row and not row.startswith(" ")]
    assert sorted(files) == sorted([bad, worse]), errors  # each file once
    under_bad = errors[errors.index(bad) + 1 :]
    assert under_bad[0].startswith("  line 2: invalid JSON"), errors
    assert under_bad[1].startswith("  line 3: "), errors
    under_worse = errors[errors.index(worse) + 1 :]
    assert under_worse[0].startswith("  line 3: invalid JSON"), errors


def test_verbose_terminal_shows_per_run_lines_as_debug_above_the_bar(
    workdir: Path, runs: Path, tracking_uri: str
) -> None:
    code, raw = run_in_terminal(
        "backfill", "runs", "--tracking-uri", tracking_uri, "-v", cwd=workdir
    )
    screen = render(raw)
    text = "\n".join(screen)
    assert code == 1, text
    created = [row for row in log_lines(screen) if "run_created" in row]
    assert len(created) == 9, text
    assert all("[debug" in row and BAR not in row for row in created), created
    assert len([row for row in screen if BAR in row]) == 1, text


def test_quiet_terminal_shows_no_info_lines_but_the_bar_summary_and_warnings(
    workdir: Path, runs: Path, tracking_uri: str
) -> None:
    code, raw = run_in_terminal(
        "backfill", "runs", "--tracking-uri", tracking_uri, "-q", cwd=workdir
    )
    screen = render(raw)
    text = "\n".join(screen)
    assert code == 1, text
    logs = log_lines(screen)
    assert logs and all("[warning" in row or "[error" in row for row in logs), text
    assert any("record_error" in row for row in logs)
    [bar] = [row for row in screen if BAR in row]
    assert "9/9 records" in bar
    assert re.search(r"^\s*with errors\s+2\s*$", text, re.M), text


def run_piped(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYNCD, *args],
        cwd=cwd,
        env=user_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def json_lines(stderr: str) -> list[dict[str, object]]:
    """Every stderr line, parsed: fails on any line that is not one JSON object."""
    entries = []
    for row in stderr.splitlines():
        entry = json.loads(row)
        assert isinstance(entry, dict), row
        entries.append(entry)
    return entries


def test_piped_output_is_json_lines_on_stderr_and_one_document_on_stdout(
    workdir: Path, runs: Path, tracking_uri: str
) -> None:
    proc = run_piped("backfill", "runs", "--tracking-uri", tracking_uri, "--json", cwd=workdir)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["records"] == 9
    entries = json_lines(proc.stderr)
    events = [e["event"] for e in entries]
    assert "backfill_start" in events and "backfill_done" in events
    assert "run_created" not in events
    assert {e["level"] for e in entries} <= {"info", "warning", "error"}


def test_piped_verbose_output_holds_mlflow_and_per_run_lines_as_json(
    workdir: Path, runs: Path
) -> None:
    proc = run_piped(
        "backfill",
        "runs",
        "--tracking-uri",
        f"sqlite:///{workdir / 'fresh.db'}",
        "--json",
        "-v",
        cwd=workdir,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["with_errors"] == 2
    entries = json_lines(proc.stderr)
    by_event = {str(e["event"]): e for e in entries}
    for event, logger in [
        ("Creating initial MLflow database tables...", "mlflow.store.db.utils"),
        ("Context impl SQLiteImpl.", "alembic.runtime.migration"),
    ]:
        assert by_event[event]["logger"] == logger
        assert by_event[event]["level"] == "debug"
    created = [e for e in entries if e["event"] == "run_created"]
    assert len(created) == 9 and all(e["level"] == "debug" for e in created)
