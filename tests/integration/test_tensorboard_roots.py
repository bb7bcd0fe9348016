"""TensorBoard event files written with tensorboardX, mirrored point by point."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import history

from syncd.backfill import Summary, backfill
from syncd.config import load_config
from syncd.snapshot.tensorboard import frames

tensorboardX = pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")


def sync(root: Path, tracking_uri: str, workdir: Path) -> Summary:
    settings = load_config(
        None,
        overrides={
            "roots": [{"path": str(root), "format": "tensorboard", "experiment": "tb"}],
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
        },
        env={},
    )
    return backfill(settings)


def f32(value: float) -> float:
    """What an event file stores (simple_value is a 32-bit float)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def runs(client: Any) -> dict[str, Any]:
    exp = client.get_experiment_by_name("tb")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_event_files_mirror_point_by_point_as_they_grow_and_across_restarts(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    # A real event file, written by tensorboardX (which writes from a thread: closed
    # first), then laid into the run folder in two parts, cut inside a frame, as a
    # live writer's file grows.
    T = 1_700_000_000.0
    scratch = workdir / "scratch"
    writer = tensorboardX.SummaryWriter(str(scratch))
    for step in range(4):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step, walltime=T + step)
        writer.add_scalar("val/acc", 0.5 + step / 10, step, walltime=T + step + 0.25)
    writer.close()
    (source,) = scratch.glob("events.out.tfevents.*")
    full = source.read_bytes()
    records, used = frames(full)
    assert len(records) == 9 and used == len(full)  # the file version event and 8 scalars
    cut = len(full) - 20  # inside the last frame (val/acc at step 3)

    root = workdir / "logs"
    live = root / "exp1" / source.name
    live.parent.mkdir(parents=True)
    live.write_bytes(full[:cut])
    summary = sync(root, tracking_uri, workdir)
    assert summary.clean and summary.synced == 1, summary.errors
    run_id = runs(client)["exp1"].info.run_id
    assert history(client, run_id, "train/loss") == [
        (step, int((T + step) * 1000), f32(1.0 / (step + 1))) for step in range(4)
    ]
    assert len(history(client, run_id, "val/acc")) == 3  # the torn frame waits

    with live.open("ab") as fh:
        fh.write(full[cut:])
    assert sync(root, tracking_uri, workdir).clean
    assert history(client, run_id, "val/acc") == [
        (step, int((T + step + 0.25) * 1000), f32(0.5 + step / 10)) for step in range(4)
    ]
    assert len(history(client, run_id, "train/loss")) == 4  # nothing twice

    # A restarted job writes a second event file in the same folder, and hparams.
    restarted = tensorboardX.SummaryWriter(str(root / "exp1"), filename_suffix=".restart")
    restarted.add_scalar("train/loss", 0.2, 4, walltime=T + 4)
    restarted.add_scalar("train/loss", 0.1, 5, walltime=T + 5)
    restarted.add_hparams({"lr": 0.01, "opt": "adam", "layers": 3}, {"hparam/acc": 0.9})
    restarted.close()
    assert len(list((root / "exp1").glob("events.out.tfevents.*"))) == 2

    summary = sync(root, tracking_uri, workdir)
    assert summary.clean, summary.errors
    found = runs(client)
    assert found["exp1"].info.run_id == run_id  # the same run, one per folder
    assert [(s, v) for s, _t, v in history(client, run_id, "train/loss")] == [
        (0, f32(1.0)),
        (1, f32(0.5)),
        (2, f32(1 / 3)),
        (3, f32(0.25)),
        (4, f32(0.2)),
        (5, f32(0.1)),
    ]
    # tensorboardX writes hparams as a run of their own (a subfolder), as TensorBoard shows
    (hp_name,) = [name for name in found if name != "exp1"]
    hp = found[hp_name]
    assert hp.data.params == {"lr": "0.01", "opt": "adam", "layers": "3"}
    assert [v for _s, _t, v in history(client, hp.info.run_id, "hparam/acc")] == [f32(0.9)]
    assert sync(root, tracking_uri, workdir).events == 0  # unchanged: nothing again


def test_an_idle_folder_finishes_its_run_at_its_last_point(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    import os
    import time

    T = 1_700_000_000.0
    folder = workdir / "logs" / "exp1"
    writer = tensorboardX.SummaryWriter(str(folder))
    for step in range(3):
        writer.add_scalar("loss", 1.0 / (step + 1), step, walltime=T + step)
    writer.close()

    def run() -> Any:
        return runs(client)["exp1"]

    assert sync(workdir / "logs", tracking_uri, workdir).clean  # default: 600 s
    assert run().info.status == "RUNNING"

    (events,) = folder.glob("events.out.tfevents.*")
    hour_ago = time.time() - 3600
    os.utime(events, (hour_ago, hour_ago))
    assert sync(workdir / "logs", tracking_uri, workdir).clean
    assert run().info.status == "FINISHED"
    assert run().info.end_time == int((T + 2) * 1000)

    writer = tensorboardX.SummaryWriter(str(folder))  # a restarted job, a new event file
    writer.add_scalar("loss", 0.1, 3, walltime=T + 100)
    writer.close()
    assert sync(workdir / "logs", tracking_uri, workdir).clean
    assert run().info.status == "RUNNING"
    assert len(history(client, run().info.run_id, "loss")) == 4
    for path in folder.glob("events.out.tfevents.*"):
        os.utime(path, (hour_ago, hour_ago))
    assert sync(workdir / "logs", tracking_uri, workdir).clean
    assert run().info.status == "FINISHED"
    assert run().info.end_time == int((T + 100) * 1000)
