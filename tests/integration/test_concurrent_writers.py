"""Several syncd processes sharing one fresh SQLite mlflow.db: none fails, nothing duplicates.

This is the failure syncd exists to remove: pipelines that write the same SQLite store
directly die with ``sqlite3.OperationalError`` while MLflow creates the schema.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import runs_by_record

from syncd import RunRecorder

pytestmark = pytest.mark.slow


def test_four_backfills_on_a_fresh_sqlite_store(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    syncd = str(Path(sys.executable).with_name("syncd"))
    record_ids = []
    for pipeline in range(4):
        for run in range(3):
            with RunRecorder(
                workdir / f"pipeline{pipeline}" / f"run{run}", experiment="shared_commodity"
            ) as rec:
                rec.log_params({"pipeline": pipeline, "run": run})
                for step in range(50):
                    rec.log_metrics({"loss": 1 / (step + 1)}, step=step)
            record_ids.append(rec.record_id)

    uri = f"sqlite:///{workdir / 'mlflow.db'}"  # does not exist yet: schema created under load
    procs = [
        subprocess.Popen(
            [
                syncd,
                "backfill",
                f"pipeline{p}",
                "--tracking-uri",
                uri,
                "--state-dir",
                f".syncd-{p}",
                "--json",
            ],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    for code, _out, err in results:
        assert code == 0, err[-3000:]
        assert "OperationalError" not in err

    client = MlflowClient(uri)
    runs = runs_by_record(client)
    assert sorted(runs) == sorted(record_ids)
    assert len(client.search_experiments(filter_string="name = 'shared_commodity'")) == 1
    for run in runs.values():
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 50
