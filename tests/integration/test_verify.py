"""`syncd verify` against real SQLite MLflow stores: clean mirrors, tampered ones, no writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from daemon_helpers import run_syncd
from helpers import EXAMPLES, T0, line, run_backfill, runs_by_record, started, write_record
from typer.testing import CliRunner

from syncd.cli import app
from syncd.sources.local import LocalRecord
from syncd.verify import read_expected

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def files_state(*paths: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of files, and the listing of folders (to prove nothing was written)."""
    out: dict[str, Any] = {}
    for path in paths:
        if path.is_dir():
            out[str(path)] = sorted(p.name for p in path.iterdir())
        else:
            out[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def record_of(runs: Path, name: str) -> Path:
    return runs / name / "run_record.jsonl"


def record_id_of(path: Path) -> str:
    return str(json.loads(path.read_text().splitlines()[0])["record_id"])


def synced_examples(workdir: Path, tracking_uri: str) -> Path:
    runs = workdir / "runs"
    shutil.copytree(EXAMPLES, runs)
    summary = run_backfill(runs, tracking_uri, workdir / ".syncd")
    assert summary.clean and summary.synced == 7, summary
    return runs


def test_clean_backfill_verifies_clean_with_the_console_script(
    workdir: Path, tracking_uri: str
) -> None:
    runs = synced_examples(workdir, tracking_uri)
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    before = files_state(db, workdir / ".syncd" / "ledger.db", workdir / ".syncd", workdir)

    proc = run_syncd("verify", "runs", "--tracking-uri", tracking_uri, cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # no difference line, only the total
    assert "mirror complete: 7 records verified, 7 clean, 0 with 0 differences" in proc.stdout
    assert "Traceback" not in proc.stderr

    code, out, _ = invoke("verify", str(runs), "--tracking-uri", tracking_uri, "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["records"], doc["clean"], doc["differences"], doc["results"]) == (7, 7, 0, [])
    assert doc["tracking_uri"] == tracking_uri
    assert doc["ledger"].endswith(".syncd/ledger.db")
    assert files_state(db, workdir / ".syncd" / "ledger.db", workdir / ".syncd", workdir) == before


def test_every_kind_of_tampering_is_named_and_exits_one(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    runs = synced_examples(workdir, tracking_uri)
    by_record = runs_by_record(client)
    resumed = record_of(runs, "2025-11-19_dssm_daily_resumed")
    oom = record_of(runs, "2025-11-20_dssm_daily_oom")
    daily = record_of(runs, "2025-11-21_dssm_daily")
    sweep = record_of(runs, "2025-11-22_dssm_sweep")
    trial0 = record_of(runs, "2025-11-22_dssm_sweep/trial_000")
    trial1 = record_of(runs, "2025-11-22_dssm_sweep/trial_001")
    trial2 = record_of(runs, "2025-11-22_dssm_sweep/trial_002")
    run = {p: by_record[record_id_of(p)] for p in (resumed, oom, daily, sweep, trial0, trial1)}

    # a deleted run
    client.delete_run(run[oom].info.run_id)
    # one metric point too many
    loss_points = len(client.get_metric_history(run[resumed].info.run_id, "loss"))
    client.log_metric(run[resumed].info.run_id, "loss", 0.25, timestamp=1, step=999)
    # a tag changed, and a parent link pointing elsewhere
    client.set_tag(run[trial0].info.run_id, "team", "someone-else")
    client.set_tag(run[trial0].info.run_id, "mlflow.parentRunId", run[resumed].info.run_id)
    # an artifact file deleted on disk
    artifact_dir = Path(unquote(urlparse(run[daily].info.artifact_uri).path))
    summary_txt = artifact_dir / "reports" / "summary.txt"
    size = summary_txt.stat().st_size
    summary_txt.unlink()
    # a second run carrying the same record id
    dup = client.create_run(
        run[trial1].info.experiment_id, tags={"syncd.record_id": record_id_of(trial1)}
    )
    # lines appended to a record, not synced
    lines_before = len(trial2.read_text().splitlines())
    write_record(
        trial2.parent,
        [
            line(lines_before, "metrics", step=100, metrics={"extra_metric": 1.0}),
            line(lines_before + 1, "tags", tags={"late": "yes"}),
        ],
        mode="a",
    )
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    ledger_db = workdir / ".syncd" / "ledger.db"
    before = files_state(db, ledger_db, workdir / ".syncd")

    code, out, err = invoke("verify", "runs", "--tracking-uri", tracking_uri)
    assert code == 1, out + err
    text = out.splitlines()
    expected_lines = [
        f"{oom}: run {run[oom].info.run_id} (expected active, found deleted)",
        f"{resumed}: metric 'loss' points (expected {loss_points}, found {loss_points + 1})",
        f"{trial0}: tag 'team' (expected 'recsys-ranking', found 'someone-else')",
        f"{trial0}: parent link (mlflow.parentRunId) (expected {run[sweep].info.run_id},"
        f" found {run[resumed].info.run_id})",
        f"{daily}: artifact 'reports/summary.txt' (expected {size} bytes, found none)",
        f"{trial2}: complete lines not yet mirrored (checkpoint at line {lines_before})"
        " (expected 0, found 2)",
        f"{trial2}: metric 'extra_metric' points (expected 1, found 0)",
        f"{trial2}: tag 'late' (expected 'yes', found none)",
    ]
    for wanted in expected_lines:
        assert wanted in text, f"{wanted!r} not in:\n{out}"
    dup_lines = [t for t in text if t.startswith(f"{trial1}: runs tagged syncd.record_id=")]
    assert len(dup_lines) == 1 and "(expected 1, found 2 (" in dup_lines[0], out
    assert dup.info.run_id in dup_lines[0] and run[trial1].info.run_id in dup_lines[0]
    assert any(t.startswith(f"{resumed}: metric 'loss' last value (expected ") for t in text)
    assert not any(t.startswith(f"{sweep}:") for t in text), out  # untouched: clean
    assert "7 records verified, 1 clean, 6 with" in text[-1]
    assert "Traceback" not in err

    code, out, _ = invoke("verify", "runs", "--tracking-uri", tracking_uri, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["records"] == 7 and doc["clean"] == 1 and doc["with_differences"] == 6
    kinds = {r["file"]: {d["kind"] for d in r["differences"]} for r in doc["results"]}
    assert kinds[str(oom)] == {"run_deleted"}
    assert kinds[str(resumed)] == {"metric_points", "metric_last"}
    assert kinds[str(trial0)] == {"tag", "parent"}
    assert kinds[str(daily)] == {"artifact"}
    assert kinds[str(trial1)] == {"run_duplicated"}
    assert kinds[str(trial2)] == {"unmirrored", "metric_points", "metric_last", "tag"}
    [daily_result] = [r for r in doc["results"] if r["file"] == str(daily)]
    assert daily_result["run_id"] == run[daily].info.run_id
    assert daily_result["differences"] == [
        {
            "kind": "artifact",
            "key": "reports/summary.txt",
            "what": "artifact 'reports/summary.txt'",
            "expected": f"{size} bytes",
            "found": "none",
        }
    ]
    assert doc["differences"] == sum(len(r["differences"]) for r in doc["results"])
    # verify wrote nothing: the store, the ledger and the state folder are as they were
    assert files_state(db, ledger_db, workdir / ".syncd") == before


def test_a_permanently_missing_run_is_named(workdir: Path, tracking_uri: str) -> None:
    path = write_record(workdir / "runs" / "a", [started("never-synced-1")])
    code, out, _ = invoke("verify", "runs", "--tracking-uri", tracking_uri)
    assert code == 1
    assert f"{path}: run (expected a run tagged syncd.record_id=never-synced-1, found none)" in out
    assert not (workdir / ".syncd").exists()  # no ledger: none is created


def test_verify_agrees_with_what_backfill_writes(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    """Truncated long params, refused names, changed params, NaN, datasets, a blocked tail."""
    long_value = "v" * 7000
    run_dir = workdir / "runs" / "edge"
    (run_dir / "out").mkdir(parents=True)
    (run_dir / "out" / "a.txt").write_text("hello")
    (run_dir / "out" / "sub").mkdir()
    (run_dir / "out" / "sub" / "b.bin").write_bytes(b"\0" * 300)
    (run_dir / "model.txt").write_text("weights")
    path = write_record(
        run_dir,
        [
            started("edge-1", run_name="edge", tags={"bad tag!": "x", "ok": "1"}, description="d"),
            line(1, "params", params={"long": long_value, "lr": 0.1, "bad key!": 1}),
            line(
                2, "metrics", step=0, metrics={"loss": "NaN", "bad metric!": 1.0, "inf": "Infinity"}
            ),
            line(3, "params", params={"lr": 0.2}),  # changed: MLflow keeps 0.1
            line(4, "metrics", step=1, metrics={"loss": 0.5}),
            line(5, "metrics", ts=T0 + 4000, step=1, metrics={"loss": 0.5}),  # one row in MLflow
            line(6, "dataset", name="train", source="s3://b/train/", digest="abc"),
            line(7, "dataset", name="eval", source="s3://b/eval/"),
            line(8, "artifact", path="out", artifact_path="outputs"),
            line(9, "artifact", path="model.txt"),
            line(10, "artifact", path="../escape.txt"),
            line(11, "run_finished", status="FAILED"),
            '{"v":2,"seq":12,"ts":1763800020000,"type":"future"}\n',
            line(13, "tags", tags={"after_block": "1"}),
        ],
    )
    summary = run_backfill(workdir / "runs", tracking_uri, workdir / ".syncd")
    assert summary.blocked == 1

    code, out, err = invoke("verify", "runs", "--tracking-uri", tracking_uri, "--json")
    assert code == 0, out + err
    assert json.loads(out)["clean"] == 1

    # the expected state really holds what the projection makes of those lines
    expected = read_expected(LocalRecord(path), run_dir=run_dir)
    assert expected.params["lr"] == "0.1" and len(expected.params["long"]) == 6000
    assert "bad key!" not in expected.params and "bad metric!" not in expected.metrics
    assert expected.metrics["loss"].count == 2 and expected.status == "FAILED"
    assert expected.artifacts == {
        "syncd/params/long.txt": 7000,
        "outputs/a.txt": 5,
        "outputs/sub/b.bin": 300,
        "model.txt": 7,
    }
    assert expected.blocked_at == 13 and expected.lines == 12
    assert "after_block" not in expected.tags

    # tamper with what only verify's care catches: the long param's artifact and a dataset
    run = runs_by_record(client)["edge-1"]
    artifact_dir = Path(unquote(urlparse(run.info.artifact_uri).path))
    (artifact_dir / "syncd" / "params" / "long.txt").write_text("short")
    client.set_terminated(run.info.run_id, status="FINISHED", end_time=5)
    code, out, _ = invoke("verify", "runs", "--tracking-uri", tracking_uri)
    assert code == 1
    assert (
        f"{path}: artifact 'syncd/params/long.txt' size (expected 7000 bytes, found 5 bytes)" in out
    )
    assert f"{path}: status (expected FAILED, found FINISHED)" in out
    assert f"{path}: end time (expected 1763800011000, found 5)" in out


def test_reading_in_small_chunks_expects_the_same(workdir: Path) -> None:
    path = write_record(
        workdir / "r",
        [
            started("chunks-1", run_name="c"),
            *[line(i, "metrics", step=i, metrics={"m": i * 0.5, "n": "NaN"}) for i in range(1, 40)],
            line(40, "params", params={"p": 1}),
            line(41, "params", params={"p": 2}),
            line(42, "tags", tags={"t": "a"}),
            line(43, "tags", tags={"t": "b"}),
        ],
    )
    whole = read_expected(LocalRecord(path))
    small = read_expected(LocalRecord(path), chunk_bytes=200)
    assert whole.params == small.params == {"p": "1"}
    assert whole.tags["t"] == small.tags["t"] == "b"
    assert {k: (v.count, v.last) for k, v in whole.metrics.items() if k == "m"} == {
        k: (v.count, v.last) for k, v in small.metrics.items() if k == "m"
    }
    assert whole.metrics["n"].count == small.metrics["n"].count == 39
    assert (whole.lines, whole.offset) == (small.lines, small.offset) == (44, path.stat().st_size)


def test_usage_errors_exit_two(workdir: Path, tracking_uri: str) -> None:
    code, _, err = invoke("verify", "does-not-exist", "--tracking-uri", tracking_uri)
    assert code == 2 and "root" in err and "does not exist" in err and "Traceback" not in err
    code, _, err = invoke("verify", "--tracking-uri", tracking_uri)
    assert code == 2 and "no roots" in err
    (workdir / "runs").mkdir()
    missing = workdir / "nowhere" / "mlflow.db"
    code, _, err = invoke("verify", "runs", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and f"the MLflow store {missing} does not exist" in err
    assert not missing.exists()


def test_secrets_in_uris_are_never_printed(workdir: Path, tracking_uri: str, client: Any) -> None:
    secret = "postgresql://syncd:hunter2@db.internal/mlflow"
    write_record(workdir / "runs" / "s", [started("sec-1", tags={"conn": secret})])
    run_backfill(workdir / "runs", tracking_uri, workdir / ".syncd")
    client.set_tag(runs_by_record(client)["sec-1"].info.run_id, "conn", secret + "2")
    for extra in ((), ("--json",)):
        code, out, err = invoke("verify", "runs", "--tracking-uri", tracking_uri, *extra)
        assert code == 1
        assert "hunter2" not in out + err and "syncd:***@db.internal" in out


def test_a_ledger_of_another_store_claims_nothing(
    workdir: Path, tracking_uri: str, mlflow_template: Path
) -> None:
    path = write_record(workdir / "runs" / "o", [started("other-1")])
    run_backfill(workdir / "runs", tracking_uri, workdir / ".syncd")
    other = workdir / "other.db"
    shutil.copy(mlflow_template, other)
    code, out, _ = invoke("verify", "runs", "--tracking-uri", f"sqlite:///{other}", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ledger"] is None
    [result] = doc["results"]
    assert result["file"] == str(path)
    assert [d["kind"] for d in result["differences"]] == ["run_missing"]


def test_models_are_verified_down_to_the_registered_version_and_alias(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from syncd import RunRecorder

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    fitted = LogisticRegression().fit(X, np.array([0, 1, 1, 0]))
    runs = workdir / "runs"
    with RunRecorder(runs / "fit", experiment="models", run_name="fit") as rec:
        mlflow.sklearn.save_model(fitted, rec.run_dir / "model", pip_requirements=[])
        model_id = rec.log_model("model", "clf", registered_model_name="scorer", alias="champion")
        rec.log_model("model", "unregistered")
    summary = run_backfill(runs, tracking_uri, workdir / ".syncd")
    assert summary.clean, summary

    def verify() -> tuple[int, list[dict[str, Any]]]:
        code, out, _ = invoke("verify", str(runs), "--tracking-uri", tracking_uri, "--json")
        doc = json.loads(out)
        return code, [d for r in doc["results"] for d in r["differences"]]

    assert verify() == (0, [])

    client.delete_registered_model_alias("scorer", "champion")
    code, diffs = verify()
    assert code == 1
    assert [(d["kind"], d["key"], d["found"]) for d in diffs] == [("model_alias", "scorer", "none")]
    assert "alias 'champion' of registered model 'scorer'" in diffs[0]["what"]
    assert diffs[0]["expected"] == "version 1"

    client.set_registered_model_alias("scorer", "champion", "1")
    assert verify() == (0, [])
    client.delete_model_version("scorer", "1")  # its alias goes with it
    code, diffs = verify()
    assert code == 1
    assert [(d["kind"], d["key"]) for d in diffs] == [
        ("model_version", "scorer"),
        ("model_alias", "scorer"),
    ]
    assert f"syncd.model_id={model_id}" in diffs[0]["what"]
    assert diffs[0]["found"] == "none"

    (mirrored,) = [
        m
        for m in client.search_logged_models(
            [client.get_experiment_by_name("models").experiment_id]
        )
        if m.name == "unregistered"
    ]
    client.delete_logged_model(mirrored.model_id)
    proc = run_syncd("verify", "runs", "--tracking-uri", tracking_uri, cwd=workdir)
    assert proc.returncode == 1
    assert "logged model 'unregistered'" in proc.stdout
    assert "(expected a LoggedModel of run" in proc.stdout
