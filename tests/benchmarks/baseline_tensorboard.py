"""The hand-written peer of ``syncd backfill --format tensorboard``: what a careful user
would write to load TensorBoard runs into MLflow. Run as a script (a whole process):

    python baseline_tensorboard.py TRACKING_URI EXPERIMENT RUN_DIR...

Per run folder: read every ``events.out.tfevents.*`` file whole, split its TFRecord
frames, decode each event (tensorboardX's protos), keep the scalars, then
``create_run`` (named after the folder, started at the first event), ``log_batch`` in
chunks of 1000 (MLflow's per-call maximum) and ``set_terminated`` at the last event.
Prints one JSON line: import and loop seconds, runs and metric points written.
"""

from __future__ import annotations

import time

_t_start = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboardX.proto.event_pb2 import Event  # noqa: E402

CHUNK = 1000


def scalars(run_dir: Path) -> tuple[list[Metric], int, int]:
    """The run's scalar points, its first and last wall time (ms)."""
    points: list[Metric] = []
    first = last = 0
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while len(data) - pos >= 12:
            (length,) = struct.unpack_from("<Q", data, pos)
            if pos + 16 + length > len(data):
                break
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            wall = int(event.wall_time * 1000)
            first = wall if not first else min(first, wall)
            last = max(last, wall)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points.append(Metric(value.tag, value.simple_value, wall, event.step))
    return points, first, last


def main(tracking_uri: str, experiment: str, run_dirs: list[str]) -> dict[str, float | int]:
    imported = time.perf_counter()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    runs = written = 0
    for run_dir in run_dirs:
        points, first, last = scalars(Path(run_dir))
        run = client.create_run(exp_id, start_time=first, run_name=Path(run_dir).name)
        runs += 1
        for i in range(0, len(points), CHUNK):
            client.log_batch(run.info.run_id, metrics=points[i : i + CHUNK])
        written += len(points)
        client.set_terminated(run.info.run_id, status="FINISHED", end_time=last)
    done = time.perf_counter()
    return {
        "import_s": imported - _t_start,
        "loop_s": done - imported,
        "runs": runs,
        "metric_points": written,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
