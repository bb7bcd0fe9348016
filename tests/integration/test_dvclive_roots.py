"""DVCLive output folders written with the real library, mirrored point by point."""

from __future__ import annotations

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
