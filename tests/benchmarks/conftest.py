"""Benchmark fixtures: the shared report, a warmed bytecode cache, per-process MLflow stores.

``mlflow_template`` (an empty, migrated MLflow SQLite db) comes from tests/conftest.py;
every measured process gets its own copy of it, so none pays schema migrations.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench_support import (
    BASELINE_SCRIPT,
    SYNCD,
    Report,
    clean_env,
    make_tree,
    run_timed,
)

_REPORT_KEY = pytest.StashKey[Report]()


def _report_path(tmp_root: Path) -> Path:
    return Path(os.environ.get("SYNCD_BENCH_REPORT") or tmp_root / "bench-report.json")


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Report:
    """The session's report; written as JSON to $SYNCD_BENCH_REPORT (default: the
    session's pytest tmp dir) after every benchmark and printed as a table at the end."""
    rep = Report(path=_report_path(tmp_path_factory.getbasetemp()))
    request.config.stash[_REPORT_KEY] = rep
    return rep


@pytest.fixture(autouse=True)
def _save_report_after_each(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep = request.config.stash.get(_REPORT_KEY, None)
    if rep is not None and rep.rows:
        rep.save()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    rep = config.stash.get(_REPORT_KEY, None)
    if rep is None or not rep.rows:
        return
    rep.save()
    terminalreporter.write_sep("=", "syncd benchmark report")
    terminalreporter.write_line(rep.table())
    terminalreporter.write_line(f"report JSON: {rep.path}")


@pytest.fixture(scope="session")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bytecode cache for measured processes, warmed by one tiny run of each tool
    (syncd backfill and the baseline), so no measured run pays compilation."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("warmup")
    cache = folder / "pycache"
    env = clean_env(cache)
    root = folder / "runs"
    make_tree(root, records=1, steps=3, metric_keys=("loss",), seed=99)
    for name in ("syncd.db", "baseline.db"):
        MlflowClient(tracking_uri=f"sqlite:///{folder / name}").search_experiments()
    files = [str(p) for p in sorted(root.rglob("run_record.jsonl"))]
    for args in (
        [SYNCD, "backfill", str(root), "--tracking-uri", f"sqlite:///{folder / 'syncd.db'}",
         "--state-dir", str(folder / "state"), "--json"],
        [sys.executable, str(BASELINE_SCRIPT), f"sqlite:///{folder / 'baseline.db'}", *files],
        [sys.executable, "-c", "import syncd.service, syncd.watch, syncd.health"],
    ):  # fmt: skip
        done = run_timed(args, cwd=folder, env=env)
        assert done.returncode == 0, f"warm-up {args[:2]} failed:\n{done.stderr[-3000:]}"
    return cache


@pytest.fixture(scope="session")
def bench_env(pycache: Path, report: Report) -> dict[str, str]:
    """The environment of every measured process (bytecode cached, warmed up)."""
    report.note(
        "measured processes run with PYTHONPYCACHEPREFIX set to a bytecode cache warmed by"
        " one tiny run of each tool"
        + (" (this environment sets PYTHONDONTWRITEBYTECODE=1, which would otherwise make"
           " every process recompile MLflow)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "")
    )  # fmt: skip
    scaled = sorted(
        k for k in os.environ if k.startswith("SYNCD_BENCH_") and k != "SYNCD_BENCH_REPORT"
    )
    if scaled:
        report.note(
            "sizes changed from the targets' by "
            + ", ".join(f"{k}={os.environ[k]}" for k in scaled)
        )
    return clean_env(pycache)


@pytest.fixture
def fresh_store(tmp_path: Path, mlflow_template: Path):  # type: ignore[no-untyped-def]
    """A factory of fresh, migrated-empty MLflow SQLite stores (copies of the template)."""

    def make(name: str) -> tuple[Path, str]:
        db = tmp_path / name
        shutil.copy(mlflow_template, db)
        return db, f"sqlite:///{db}"

    return make
