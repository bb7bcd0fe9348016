"""Test helpers: write records by hand (including broken ones) and read MLflow back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from syncd.backfill import Summary, backfill
from syncd.config import load_config

T0 = 1_763_800_000_000
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "runs"


def line(seq: int, etype: str, ts: int | None = None, **fields: Any) -> str:
    obj = {"v": 1, "seq": seq, "ts": T0 + seq * 1000 if ts is None else ts, "type": etype}
    obj.update(fields)
    return json.dumps(obj, separators=(",", ":")) + "\n"


def write_record(run_dir: Path, lines: list[str], *, mode: str = "w") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run_record.jsonl"
    with path.open(mode, encoding="utf-8") as fh:
        fh.write("".join(lines))
    return path


def started(record_id: str, experiment: str = "exp", **fields: Any) -> str:
    return line(0, "run_started", record_id=record_id, experiment=experiment, **fields)


def run_backfill(
    root: Path, tracking_uri: str, state_dir: Path | None = None, **kw: Any
) -> Summary:
    settings = load_config(
        None,
        overrides={
            "roots": [{"path": str(root)}],
            "tracking_uri": tracking_uri,
            "state_dir": str(state_dir or root.parent / ".syncd"),
        },
        env={},
    )
    return backfill(settings, **kw)


def runs_by_record(client: Any, experiments: list[str] | None = None) -> dict[str, Any]:
    """Every run in the store (or in the named experiments) keyed by its syncd.record_id tag."""
    from mlflow.entities import ViewType

    exps = [
        e.experiment_id
        for e in client.search_experiments(view_type=ViewType.ALL)
        if experiments is None or e.name in experiments
    ]
    if not exps:
        return {}
    out: dict[str, Any] = {}
    for run in client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000):
        rid = run.data.tags.get("syncd.record_id")
        assert rid not in out, f"duplicate run for record {rid}"
        out[rid] = run
    return out


def history(client: Any, run_id: str, key: str) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))


def comparable_history(client: Any, run_id: str, key: str) -> list[tuple[int, int, Any]]:
    """History with NaN spelled out, so that two equal histories compare equal."""
    return [(s, t, "NaN" if v != v else v) for s, t, v in history(client, run_id, key)]


def artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out.extend(artifact_files(client, run_id, info.path))
        else:
            out.append(info.path)
    return sorted(out)


def snapshot(client: Any, experiments: list[str] | None = None) -> dict[str, Any]:
    """Everything a user would compare between two syncs of the same records."""
    state: dict[str, Any] = {}
    for rid, run in runs_by_record(client, experiments).items():
        rid_state = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start": run.info.start_time,
            "end": run.info.end_time,
            "params": dict(run.data.params),
            "tags": dict(run.data.tags.items()),
            "metrics": {
                key: comparable_history(client, run.info.run_id, key) for key in run.data.metrics
            },
            "artifacts": artifact_files(client, run.info.run_id),
            "inputs": sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs),
        }
        state[rid] = rid_state
    return state
