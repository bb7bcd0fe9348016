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
