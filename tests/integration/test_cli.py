"""The syncd command line as a user meets it: exit codes, summaries, status, no tracebacks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from daemon_helpers import run_syncd
from helpers import EXAMPLES, REPO, line, started, write_record
from typer.testing import CliRunner

from syncd.cli import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_backfill_json_summary_and_exit_zero(workdir: Path, tracking_uri: str) -> None:
    shutil.copytree(EXAMPLES, workdir / "runs")
    code, out, _ = invoke("backfill", "runs", "--tracking-uri", tracking_uri, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["records"] == 7
    assert summary["synced"] == 7
    assert summary["metric_points"] > 0 and summary["artifacts"] == 7
    assert summary["errors"] == []


def test_backfill_with_a_bad_record_exits_one_and_names_file_and_line(
    workdir: Path, tracking_uri: str
) -> None:
    bad = write_record(workdir / "runs" / "bad", [started("b1"), "{oops\n"])
    write_record(workdir / "runs" / "good", [started("g1")])
    code, out, _ = invoke("backfill", "runs", "--tracking-uri", tracking_uri)
    assert code == 1
    assert f"\n{bad}\n  line 2: invalid JSON" in out  # errors grouped under their file
    assert re.search(r"^\s*clean\s+1\s*$", out, re.M)
    assert re.search(r"^\s*with errors\s+1\s*$", out, re.M)

    code, out, _ = invoke("status", "--tracking-uri", tracking_uri, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["records"]["synced"] == 1 and report["records"]["error"] == 1
    [rec] = report["records_with_errors"]
    assert rec["source"] == bad.as_uri()
    assert rec["errors"][0]["line"] == 2 and "invalid JSON" in rec["errors"][0]["reason"]
    assert report["last_sync_at"] is not None
    assert report["recent"]

    code, out, _ = invoke("status", "--tracking-uri", tracking_uri)
    assert "line 2: invalid JSON" in out


def test_usage_and_config_errors_exit_two_without_traceback(workdir: Path) -> None:
    code, _, err = invoke("backfill", "does-not-exist")
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    code, _, err = invoke("backfill")
    assert code == 2 and "no roots" in err
    (workdir / "bad.yaml").write_text("roots: [runs]\nwatch:\n  mode: fast\n")
    code, _, err = invoke("backfill", "--config", "bad.yaml")
    assert code == 2 and "watch.mode" in err
    code, _, _ = invoke("backfill", "--no-such-flag")
    assert code == 2


def test_status_before_any_sync(workdir: Path) -> None:
    code, out, _ = invoke("status", "--json")
    assert code == 0
    assert json.loads(out)["records"] == {}


def test_relative_sqlite_uri_is_resolved_once_and_logged_absolute(
    workdir: Path, mlflow_template: Path
) -> None:
    shutil.copy(mlflow_template, workdir / "mlflow.db")
    write_record(workdir / "runs" / "r", [started("rel1"), line(1, "metrics", metrics={"a": 1})])
    code, out, _ = invoke("backfill", "runs", "--json")  # default: sqlite:///mlflow.db
    assert code == 0
    assert json.loads(out)["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"


@pytest.mark.slow
def test_quickstart_command_in_a_real_process(tmp_path: Path) -> None:
    """The README's first command, as a subprocess of the installed console script."""
    shutil.copytree(EXAMPLES, tmp_path / "examples" / "runs")
    proc = run_syncd("backfill", "examples/runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s*records\s+7\s*$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\s*clean\s+7\s*$", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "mlflow.db").exists()
    again = run_syncd("backfill", "examples/runs", cwd=tmp_path)
    assert again.returncode == 0
    assert re.search(r"^\s*unchanged\s+7\s*$", again.stdout, re.M), again.stdout
    assert "Traceback" not in proc.stderr + again.stderr
    assert REPO.exists()
