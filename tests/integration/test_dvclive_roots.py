"""DVCLive output folders written with the real library, mirrored point by point."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import history

from syncd.backfill import Summary, backfill
from syncd.config import load_config

dvclive = pytest.importorskip("dvclive", reason="the dvclive extra is not installed")


def sync(root: Path, tracking_uri: str, workdir: Path) -> Summary:
    settings = load_config(
        None,
        overrides={
            "roots": [{"path": str(root), "format": "dvclive", "experiment": "dvc"}],
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
        },
        env={},
    )
    return backfill(settings)


def tsv_rows(path: Path) -> list[list[str]]:
    return [row.split("\t") for row in path.read_text().splitlines()[1:]]


def test_dvclive_folders_mirror_point_by_point_and_follow_appends(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "experiments"
    folder = root / "ranker" / "dvclive"
    live = dvclive.Live(str(folder), save_dvc_exp=False, resume=False)
    live.log_params({"lr": 0.01, "model": {"depth": 4, "act": "relu"}, "tags": ["a", "b"]})
    for step in range(5):
        live.log_metric("train/loss", 1.0 / (step + 1), timestamp=True)
        live.log_metric("val/auc", 0.5 + step / 20)
        live.log_metric("epoch_seconds", 3.25 + step, plot=False)
        live.next_step()

    summary = sync(root, tracking_uri, workdir)
    assert summary.clean and summary.synced == 1, summary.errors
    exp = client.get_experiment_by_name("dvc")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "ranker"
    assert run.data.params == {
        "lr": "0.01",
        "model.depth": "4",
        "model.act": "relu",
        "tags": '["a","b"]',
    }
    loss_rows = tsv_rows(folder / "plots" / "metrics" / "train" / "loss.tsv")
    assert history(client, run.info.run_id, "train/loss") == [
        (int(step), int(ts), float(value)) for ts, step, value in loss_rows
    ]
    auc = history(client, run.info.run_id, "val/auc")
    assert [(s, v) for s, _t, v in auc] == [
        (int(step), float(value))
        for step, value in tsv_rows(folder / "plots" / "metrics" / "val" / "auc.tsv")
    ]
    # a value logged without a history: its latest value, at the summary's step
    assert [(s, v) for s, _t, v in history(client, run.info.run_id, "epoch_seconds")] == [(4, 7.25)]

    # The training goes on in the same folder: only the new rows are read and mirrored.
    live = dvclive.Live(str(folder), save_dvc_exp=False, resume=True)
    for _ in range(3):
        step = live.step
        live.log_metric("train/loss", 1.0 / (step + 1), timestamp=True)
        live.log_metric("val/auc", 0.5 + step / 20)
        live.next_step()
    live.end()
    summary = sync(root, tracking_uri, workdir)
    assert summary.clean, summary.errors
    loss_rows = tsv_rows(folder / "plots" / "metrics" / "train" / "loss.tsv")
    assert len(loss_rows) == 8
    assert history(client, run.info.run_id, "train/loss") == [
        (int(step), int(ts), float(value)) for ts, step, value in loss_rows
    ]
    assert len(history(client, run.info.run_id, "val/auc")) == 8
    assert sync(root, tracking_uri, workdir).events == 0  # unchanged: nothing again
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id


def write_history(folder: Path, key: str, rows: range) -> None:
    path = folder / "plots" / "metrics" / f"{key}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a") as fh:
        if new:
            fh.write(f"timestamp\tstep\t{key}\n")
        for step in rows:
            fh.write(f"{1_700_000_000_000 + step * 10}\t{step}\t{step / 7}\n")
    (folder / "metrics.json").write_text(json.dumps({key: rows[-1] / 7, "step": rows[-1]}))


@pytest.mark.slow
def test_sigkills_while_histories_grow_lose_and_duplicate_nothing(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    """SIGKILLs of backfill and run at random times while DVCLive-format histories grow
    between kills (startup, translation, derived appends or MLflow writes are cut);
    a final backfill leaves every row exactly once."""
    import random
    import signal
    import subprocess

    from daemon_helpers import SYNCD, free_port, run_syncd

    state = workdir / "state"
    root = workdir / "dv"
    rng = random.Random(16)
    folders = [root / f"run{i}" for i in range(4)]
    rows = dict.fromkeys(folders, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACK"))}

    def grow() -> None:
        for folder in folders:
            more = rng.randint(200, 800)
            write_history(folder, "loss", range(rows[folder], rows[folder] + more))
            rows[folder] += more

    kills = 0
    for _ in range(4):
        grow()
        kind = rng.choice(["backfill", "run"])
        args = [SYNCD, kind, str(root), "--format", "dvclive", "--tracking-uri", tracking_uri]
        args += ["--state-dir", str(state), "--log-format", "json"]
        if kind == "run":
            args += ["--health-addr", f"127.0.0.1:{free_port()}"]
        after_s = rng.uniform(2.0, 12.0)  # startup, translation, derived appends or writes
        with (workdir / "syncd.log").open("ab") as log:
            proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=log)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(after_s)  # a backfill may end by itself first
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2

    done = run_syncd(
        "backfill",
        str(root),
        "--format",
        "dvclive",
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(state),
        cwd=workdir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    exp = client.get_experiment_by_name("dvclive")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(found) == sorted(f.name for f in folders)  # one run per folder
    for folder in folders:
        points = history(client, found[folder.name].info.run_id, "loss")
        assert points == [
            (step, 1_700_000_000_000 + step * 10, step / 7) for step in range(rows[folder])
        ], folder.name


def age(folder: Path, seconds: float) -> None:
    """Every file of the folder last written ``seconds`` ago (a job that went quiet)."""
    import time

    when = time.time() - seconds
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def log_losses(folder: Path, steps: int, *, resume: bool) -> Any:
    """``steps`` more ``loss`` points (1 / (step + 1), with timestamps) through DVCLive."""
    live = dvclive.Live(str(folder), save_dvc_exp=False, resume=resume)
    for _ in range(steps):
        live.log_metric("loss", 1.0 / (live.step + 1), timestamp=True)
        live.next_step()
    return live


def test_an_idle_folder_finishes_its_run_and_reopens_when_it_grows(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "experiments"
    folder = root / "ranker" / "dvclive"
    live = log_losses(folder, 3, resume=False)
    live.end()  # DVCLive writes no end marker to the folder: idleness ends the run

    def run() -> Any:
        (found,) = client.search_runs([client.get_experiment_by_name("dvc").experiment_id])
        return found

    def last_ts() -> int:
        return int(tsv_rows(folder / "plots" / "metrics" / "loss.tsv")[-1][0])

    def backfill_once() -> Summary:
        settings = load_config(
            None,
            overrides={
                "roots": [
                    {
                        "path": str(root),
                        "format": "dvclive",
                        "experiment": "dvc",
                        "finish_after_idle": 600,
                    }
                ],
                "tracking_uri": tracking_uri,
                "state_dir": str(workdir / ".syncd"),
            },
            env={},
        )
        summary = backfill(settings)
        assert summary.clean, summary.errors
        return summary

    backfill_once()
    assert run().info.status == "RUNNING"  # written just now: maybe still training

    age(folder, 3600)
    backfill_once()
    assert run().info.status == "FINISHED"
    assert run().info.end_time == last_ts()  # the last data point's wall time

    # the job goes on in the same folder after all: its new points still land
    live = log_losses(folder, 2, resume=True)
    live.end()
    backfill_once()
    assert run().info.status == "RUNNING"
    assert len(history(client, run().info.run_id, "loss")) == 5

    age(folder, 3600)
    backfill_once()
    assert run().info.status == "FINISHED"
    assert run().info.end_time == last_ts()
    assert len(history(client, run().info.run_id, "loss")) == 5  # nothing twice


@pytest.mark.slow
def test_the_daemon_finishes_an_idle_run_and_reopens_it_when_training_goes_on(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    import yaml
    from daemon_helpers import SyncdProcess, wait_for

    root = workdir / "experiments"
    folder = root / "ranker" / "dvclive"
    live = log_losses(folder, 3, resume=False)
    config = workdir / "syncd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "roots": [
                    {
                        "path": str(root),
                        "format": "dvclive",
                        "experiment": "dvc",
                        "finish_after_idle": 3,
                    }
                ],
                "tracking_uri": tracking_uri,
                "state_dir": str(workdir / ".syncd"),
                "watch": {"rescan_interval": 0.5},
            }
        )
    )
    daemon = SyncdProcess(workdir, "--config", str(config))

    def run() -> Any:
        exp = client.get_experiment_by_name("dvc")
        found = client.search_runs([exp.experiment_id]) if exp else []
        return found[0] if found else None

    def last_ts() -> int:
        return int(tsv_rows(folder / "plots" / "metrics" / "loss.tsv")[-1][0])

    try:
        daemon.wait_ready()
        wait_for(lambda: run() and run().info.status == "FINISHED", 60, 0.1, "the idle end")
        assert run().info.end_time == last_ts()
        assert len(history(client, run().info.run_id, "loss")) == 3

        live.log_metric("loss", 0.1, timestamp=True)  # the same job, later
        live.next_step()
        wait_for(
            lambda: len(history(client, run().info.run_id, "loss")) == 4,
            60,
            0.1,
            "the new point",
        )
        wait_for(lambda: run().info.status == "FINISHED", 60, 0.1, "the second idle end")
        assert run().info.end_time == last_ts()
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.kill()
    assert len(history(client, run().info.run_id, "loss")) == 4
