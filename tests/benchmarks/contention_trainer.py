"""One training job of the contention benchmark, run as its own process:

    python contention_trainer.py direct   TRACKING_URI INDEX STEPS
    python contention_trainer.py recorder RUN_DIR      INDEX STEPS

Imports first, then waits for a line on stdin (the start gate, so that every
trainer starts logging at the same instant), then logs STEPS steps of four
metrics: through MLflow's fluent API straight into the store (``direct``), or
through ``RunRecorder`` (``recorder``). Prints one JSON line: the seconds spent
inside logging calls, and the error if a call failed.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
KEYS = ("loss", "acc", "lr", "grad_norm")


def main(mode: str, target: str, index: int, steps: int) -> dict[str, object]:
    if mode == "direct":
        import mlflow
    else:
        from syncd import RunRecorder
    sys.stdin.readline()  # the gate
    logging_s = 0.0
    error = None

    def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal logging_s
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:  # a call that failed took its time too
            logging_s += time.perf_counter() - t

    try:
        if mode == "direct":
            timed(mlflow.set_tracking_uri, target)
            timed(mlflow.set_experiment, "contention")
            timed(mlflow.start_run, run_name=f"trainer-{index}")
        else:
            recorder = RunRecorder(target, experiment="contention", run_name=f"trainer-{index}")
            timed(recorder.start)
        log = mlflow.log_metrics if mode == "direct" else recorder.log_metrics
        for step in range(steps):
            values = {key: (step + i) / (steps + 1) for i, key in enumerate(KEYS)}
            timed(log, values, step=step)
        timed(mlflow.end_run if mode == "direct" else recorder.finish)
    except Exception as exc:  # a failed trainer: what the user would see
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {"logging_s": logging_s, "error": error}


if __name__ == "__main__":
    mode, target, index, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(mode, target, index, steps)), flush=True)
