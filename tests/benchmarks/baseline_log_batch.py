"""The hand-written baseline: what a careful user would write to load run records
into MLflow without syncd. Run as a script (a whole process, like ``syncd backfill``):

    python baseline_log_batch.py TRACKING_URI RECORD_FILE...

Per record: read the JSONL, get-or-create the experiment (cached), ``create_run``
with the record's start time, tags and name, ``log_batch`` of params and tags,
metrics in chunks of 1000 (MLflow's per-call maximum), then ``set_terminated``.
Prints one JSON line: import and loop seconds, runs and metric points written.
"""

from __future__ import annotations

import time

_t_start = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
CHUNK = 1000  # MLflow's maximum metrics per log_batch


def main(tracking_uri: str, files: list[str]) -> dict[str, float | int]:
    imported = time.perf_counter()
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments: dict[str, str] = {}
    runs = points = 0
    for path in files:
        with open(path, encoding="utf-8") as fh:
            events = [json.loads(raw) for raw in fh]
        start = events[0]
        name = start["experiment"]
        exp_id = experiments.get(name)
        if exp_id is None:
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name)
            experiments[name] = exp_id
        run = client.create_run(
            exp_id,
            start_time=start["ts"],
            tags=start.get("tags") or {},
            run_name=start.get("run_name"),
        )
        run_id = run.info.run_id
        runs += 1
        params: list[Param] = []
        tags: list[RunTag] = []
        metrics: list[Metric] = []
        status, end_time = "FINISHED", None
        for ev in events[1:]:
            etype = ev["type"]
            if etype == "metrics":
                ts, step = ev["ts"], ev.get("step", 0)
                for key, value in ev["metrics"].items():
                    value = _SPECIAL.get(value, value) if isinstance(value, str) else value
                    metrics.append(Metric(key, float(value), ts, step))
                if len(metrics) >= CHUNK:
                    client.log_batch(run_id, metrics=metrics[:CHUNK])
                    points += CHUNK
                    del metrics[:CHUNK]
            elif etype == "params":
                params += [Param(k, str(v)) for k, v in ev["params"].items()]
            elif etype == "tags":
                tags += [RunTag(k, v) for k, v in ev["tags"].items()]
            elif etype == "run_finished":
                status, end_time = ev["status"], ev["ts"]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
            points += len(metrics)
        for i in range(0, max(len(params), len(tags)), 100):
            client.log_batch(run_id, params=params[i : i + 100], tags=tags[i : i + 100])
        client.set_terminated(run_id, status=status, end_time=end_time)
    done = time.perf_counter()
    return {
        "import_s": imported - _t_start,
        "loop_s": done - imported,
        "runs": runs,
        "metric_points": points,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
