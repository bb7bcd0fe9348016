"""The bad-input corpus (tests/corpus) through one backfill pass and through `syncd run`.

Every case sits beside the others in ONE root: a bad record must never stop the
good ones. For each case the test checks what lands in a real SQLite MLflow store
(read back with MlflowClient), what is reported (file, line, reason) in the
backfill ``--json`` summary and in ``syncd status --json``, the record's state in
the ledger, the exit code, and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from corpus.cases import CASES, Case, build_corpus, expected_run_count
from daemon_helpers import SyncdProcess, run_syncd, wait_for
from helpers import T0, history, line, runs_by_record, started, write_record

from syncd.ledger import Ledger

RECORD_STATES = ("synced", "error", "failed", "blocked", "pending")


@dataclass
class Corpus:
    work: Path
    root: Path
    state_dir: Path
    uri: str
    cases: list[Case]

    def path(self, case: Case) -> Path:
        return case.path(self.root)

    def ledger_state(self, case: Case) -> str | None:
        ledger = Ledger(f"sqlite:///{self.state_dir / 'ledger.db'}", self.uri)
        try:
            row = ledger.get_record(self.path(case).as_uri())
        finally:
            ledger.close()
        return row.state if row else None

    def record_files(self) -> int:
        files = [c for c in self.cases if c.state is not None]
        return len(files) + sum(1 for c in files if c.name == "duplicate_record_id")


def make_corpus(tmp_path_factory: pytest.TempPathFactory, template: Path, name: str) -> Corpus:
    work = tmp_path_factory.mktemp(name)
    db = work / "mlflow.db"
    shutil.copy(template, db)
    return Corpus(
        work=work,
        root=work / "runs",
        state_dir=work / "state",
        uri=f"sqlite:///{db}",
        cases=build_corpus(work / "runs"),
    )


@dataclass
class Result:
    corpus: Corpus
    code: int
    stderr: str
    summary: dict[str, Any] | None
    status: dict[str, Any]
    runs: dict[str, Any]
    client: Any


def status_of(corpus: Corpus) -> tuple[dict[str, Any], str]:
    proc = run_syncd(
        "status",
        "--tracking-uri",
        corpus.uri,
        "--state-dir",
        str(corpus.state_dir),
        "--json",
        cwd=corpus.work,
    )
    assert proc.returncode == 1, proc.stderr  # the corpus has records with errors
    return json.loads(proc.stdout), proc.stderr


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-5000:]
    assert "internal error" not in text, text[-5000:]


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Result]:
    from mlflow.tracking import MlflowClient

    corpus = make_corpus(tmp_path_factory, mlflow_template, "corpus-backfill")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(corpus.work)  # artifacts land in ./mlruns of the store's folder
        proc = run_syncd(
            "backfill",
            str(corpus.root),
            "--tracking-uri",
            corpus.uri,
            "--state-dir",
            str(corpus.state_dir),
            "--json",
            cwd=corpus.work,
            timeout=240,
        )
        try:
            summary = json.loads(proc.stdout)
        except ValueError:
            summary = None
        status, status_err = status_of(corpus)
        client = MlflowClient(tracking_uri=corpus.uri)
        yield Result(
            corpus,
            proc.returncode,
            proc.stderr + status_err,
            summary,
            status,
            runs_by_record(client),
            client,
        )


def check_reported(case: Case, corpus: Corpus, status: dict[str, Any]) -> None:
    """The record's state in the ledger and its errors in `syncd status --json`."""
    path = corpus.path(case)
    assert corpus.ledger_state(case) == case.state
    listed = {r["source"]: r for r in status["records_with_errors"]}
    entry = listed.get(path.as_uri())
    if case.state in ("synced", "pending", None):
        assert entry is None, entry
        return
    assert entry is not None, f"{path} missing from status records_with_errors"
    assert entry["state"] == case.state
    for want_line, part in case.errors:
        whole_record = want_line is None and part in (entry.get("reason") or "")
        assert whole_record or any(
            (want_line is None or e["line"] == want_line) and part in e["reason"]
            for e in entry["errors"]
        ), f"status lacks line {want_line} {part!r}: {entry}"


def case_params() -> list[Any]:
    marks: dict[str, list[Any]] = {}
    for case in CASES:
        if case.skip:
            marks[case.name] = [pytest.mark.skip(reason=case.skip)]
    return [pytest.param(case, id=case.name, marks=marks.get(case.name, [])) for case in CASES]


def test_backfill_is_one_pass_over_every_case(backfilled: Result) -> None:
    no_traceback(backfilled.stderr)
    assert backfilled.summary is not None, backfilled.stderr[-3000:]
    assert backfilled.code == 1  # records with errors; everything else synced
    summary = backfilled.summary
    assert summary["aborted"] is None
    assert summary["records"] == backfilled.corpus.record_files()
    by_state = {
        "synced": summary["synced"],
        "error": summary["with_errors"],
        "failed": summary["failed"],
        "blocked": summary["blocked"],
        "pending": summary["pending"],
    }
    expected = dict.fromkeys(RECORD_STATES, 0)
    for case in backfilled.corpus.cases:
        if case.state is not None:
            expected[case.state] += 2 if case.name == "duplicate_record_id" else 1
    dup = next(c for c in backfilled.corpus.cases if c.name == "duplicate_record_id")
    expected[str(dup.state)] -= 1  # duplicate_record_id: its first file is clean
    expected["synced"] += 1
    assert by_state == expected
    assert len(backfilled.runs) == expected_run_count(backfilled.corpus.cases)


@pytest.mark.parametrize("case", case_params())
def test_backfill_case(backfilled: Result, case: Case) -> None:
    corpus = backfilled.corpus
    assert backfilled.summary is not None, backfilled.stderr[-3000:]
    path = corpus.path(case)
    mine = [e for e in backfilled.summary["errors"] if e["file"] == str(path)]
    for want_line, part in case.errors:
        assert any(
            (want_line is None or e["line"] == want_line) and part in e["reason"] for e in mine
        ), f"no error at line {want_line} with {part!r}: {mine}"
    if case.state != "failed":
        assert len(mine) == len(case.errors), mine
    if case.state is None:  # not a record: never mentioned anywhere
        assert not [e for e in backfilled.summary["errors"] if str(path) in e["file"]]
    check_reported(case, corpus, backfilled.status)
    if case.check is not None:
        case.check(backfilled.client, backfilled.runs)


def test_second_backfill_reads_nothing_again(backfilled: Result) -> None:
    """The same pass again: nothing is re-applied and still no traceback."""
    corpus = backfilled.corpus
    proc = run_syncd(
        "backfill",
        str(corpus.root),
        "--tracking-uri",
        corpus.uri,
        "--state-dir",
        str(corpus.state_dir),
        "--json",
        cwd=corpus.work,
        timeout=240,
    )
    no_traceback(proc.stderr)
    summary = json.loads(proc.stdout)
    assert summary["events"] == 0 and summary["metric_points"] == 0
    assert proc.returncode == 1


# -- the same corpus under `syncd run` ----------------------------------------------------


@dataclass
class DaemonResult:
    result: Result
    logs: str
    exit_code: int


@pytest.fixture(scope="module")
def daemon_run(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
) -> Iterator[DaemonResult]:
    from mlflow.tracking import MlflowClient

    corpus = make_corpus(tmp_path_factory, mlflow_template, "corpus-daemon")
    client = MlflowClient(tracking_uri=corpus.uri)
    want_runs = expected_run_count(corpus.cases)
    record_cases = [c for c in corpus.cases if c.state is not None]
    proc = SyncdProcess(
        corpus.work,
        str(corpus.root),
        "--tracking-uri",
        corpus.uri,
        "--state-dir",
        str(corpus.state_dir),
    )
    try:

        def caught_up() -> bool:
            """Every record has a ledger row, the backlog is empty, every valid run exists."""
            if proc.proc.poll() is not None:
                raise AssertionError(f"syncd exited {proc.proc.returncode}:\n{proc.logs()}")
            unseen = [c.name for c in record_cases if corpus.ledger_state(c) is None]
            code, body = proc.health("/healthz")
            return (
                not unseen
                and code == 200
                and body["backlog_records"] == 0
                and len(runs_by_record(client)) >= want_runs
            )

        try:
            wait_for(caught_up, 90, 0.5, "the corpus synced by syncd run")
        except AssertionError:
            print(proc.logs()[-20000:])
            raise
        assert proc.get("/healthz")[0] == 200

        # the daemon goes on: a new good record and a line appended to the good one
        write_record(
            corpus.root / "zz_appended",
            [started("c_appended"), line(1, "metrics", metrics={"late": 1.0})],
        )
        good = next(c for c in corpus.cases if c.name == "good")
        write_record(
            corpus.path(good).parent,
            [line(4, "metrics", metrics={"loss": 0.25}, step=1)],
            mode="a",
        )

        def appended() -> bool:
            runs = runs_by_record(client)
            return (
                "c_appended" in runs
                and history(client, runs["c_appended"].info.run_id, "late") == [(0, T0 + 1000, 1.0)]
                and len(history(client, runs["c_good"].info.run_id, "loss")) == 2
            )

        wait_for(appended, 60, 0.25, "records written after the bad ones")
        code, body = proc.health("/healthz")
        assert code == 200 and body["status"] == "ok", body
        assert proc.proc.poll() is None
        exit_code = proc.stop()
    finally:
        proc.kill()
    status, status_err = status_of(corpus)
    runs = runs_by_record(client)
    yield DaemonResult(
        Result(corpus, exit_code, status_err, None, status, runs, client),
        proc.logs(),
        exit_code,
    )


@pytest.mark.slow
def test_daemon_stays_up_and_keeps_syncing(daemon_run: DaemonResult) -> None:
    no_traceback(daemon_run.logs)
    no_traceback(daemon_run.result.stderr)
    assert daemon_run.exit_code == 0
    assert len(daemon_run.result.runs) == expected_run_count(daemon_run.result.corpus.cases) + 1


@pytest.mark.slow
@pytest.mark.parametrize("case", case_params())
def test_daemon_case(daemon_run: DaemonResult, case: Case) -> None:
    result = daemon_run.result
    check_reported(case, result.corpus, result.status)
    if case.check is not None and case.name != "good":  # good got a line more
        case.check(result.client, result.runs)
