"""A stateful test of the real engine, ledger and SQLite MLflow store under injected faults.

Hypothesis drives appends (whole and torn lines), replacements of a record by a
new one, restarts (a new engine and sink, as after a crash), and syncs during
which any MLflow call may fail before it reaches MLflow, fail after MLflow
applied it (the reply is lost), or be refused; any ledger commit may fail
before or after it is durable. After a final sync without faults, MLflow must
equal the model: one run per record_id, and each complete line of a record
exactly once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import T0
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from syncd.engine import Engine, RetryBackoff
from syncd.errors import LedgerError
from syncd.ledger import Ledger
from syncd.sink import MlflowSink, RetryPolicy
from syncd.sources.local import LocalRecord

pytestmark = pytest.mark.slow

WRITE_CALLS = ("create_run", "log_batch", "set_terminated", "update_run", "set_tag")
READ_CALLS = ("search_runs", "get_experiment_by_name")


class InjectedFault(ConnectionError):
    """Looks like a network failure to syncd's error mapping (transient)."""


class FaultyClient:
    """The real MlflowClient; chosen calls fail before reaching MLflow or after it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.plan: dict[int, str] = {}  # call number -> "before" | "after" | "refuse"
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.real, name)
        if name not in WRITE_CALLS + READ_CALLS:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            mode = self.plan.get(self.calls)
            if mode == "before" or (mode and name in READ_CALLS):
                raise InjectedFault(f"injected: {name} refused before MLflow")
            if mode == "refuse" and name != "log_batch":
                # A refused batch is split to find the bad entries, which are then
                # reported and dropped: right for invalid data, which these lines are not.
                from mlflow.exceptions import MlflowException

                raise MlflowException(f"injected: {name} refused", error_code="BAD_REQUEST")
            result = target(*args, **kwargs)
            if mode == "after":
                raise InjectedFault(f"injected: the reply to {name} was lost")
            return result

        return call


class FaultyLedger(Ledger):
    """A real ledger whose commits may fail before or after they are durable."""

    fault: str | None = None

    def commit(self, progress: Any, lease: Any = None) -> None:
        fault, self.fault = self.fault, None
        if fault == "before":
            raise LedgerError("injected: ledger unreachable")
        super().commit(progress, lease)
        if fault == "after":
            raise LedgerError("injected: ledger acknowledgement lost")


def metric_line(seq: int, value: int) -> bytes:
    obj = {"v": 1, "seq": seq, "ts": T0 + seq, "type": "metrics", "step": seq}
    obj["metrics"] = {"m": float(value)}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def start_line(record_id: str, experiment: str) -> bytes:
    obj = {"v": 1, "seq": 0, "ts": T0, "type": "run_started", "record_id": record_id}
    obj["experiment"] = experiment
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def runs_of(client: Any, experiment: str) -> dict[str, Any]:
    """This example's runs by record_id; a duplicate run fails the test."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out: dict[str, Any] = {}
    for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
        rid = run.data.tags["syncd.record_id"]
        assert rid not in out, f"duplicate run for record {rid}"
        out[rid] = run
    return out


class EngineModel(RuleBasedStateMachine):
    """One example: its own ledger, record file and experiment, in a store shared by all."""

    workdir: Path
    uri: str
    examples = 0

    @initialize()
    def setup(self) -> None:
        EngineModel.examples += 1
        self.experiment = f"model-{EngineModel.examples}"
        self.dir = Path(self.workdir) / self.experiment
        self.dir.mkdir(parents=True)
        self.path = self.dir / "runs" / "r" / "run_record.jsonl"
        self.path.parent.mkdir(parents=True)
        self.generation = 0
        self.content = b""  # the record file as the model sees it
        self.complete: dict[str, set[int]] = {}  # record_id -> values of complete lines
        self.ever: dict[str, set[int]] = {}  # every value a record's file ever held
        self.record_id = ""
        self.seq = 0
        self._new_record()
        self._restart()

    # -- helpers -------------------------------------------------------------------

    def _new_record(self) -> None:
        self.generation += 1
        self.record_id = f"{self.experiment}-rec{self.generation}"
        self.seq = 0
        self.content = start_line(self.record_id, self.experiment)
        self.complete[self.record_id] = set()
        self.ever[self.record_id] = set()
        self.path.write_bytes(self.content)

    def _restart(self) -> None:
        self.ledger = FaultyLedger(f"sqlite:///{self.dir / 'ledger.db'}", self.uri)
        self.sink = MlflowSink(self.uri, retry=RetryPolicy(attempts=1, base_delay=0.0))
        self.client = FaultyClient(self.sink.client)
        self.sink.calls._client = self.client  # type: ignore[assignment]
        self.engine = Engine(self.ledger, self.sink, backoff=RetryBackoff(base=0.0, cap=0.0))

    def _sync(self) -> None:
        record = LocalRecord(self.path)
        try:
            self.engine.sync(record)
        except LedgerError:
            pass  # the daemon backs off and tries again; so does this model
        finally:
            record.close()

    # -- rules ---------------------------------------------------------------------

    @rule(values=st.lists(st.integers(0, 10**6), min_size=1, max_size=4), torn=st.booleans())
    def append(self, values: list[int], torn: bool) -> None:
        previous_tail, self.pending_tail = getattr(self, "pending_tail", b""), b""
        data = b""
        for value in values:
            self.seq += 1
            data += metric_line(self.seq, value)
            self.complete[self.record_id].add(self.seq)
            self.ever[self.record_id].add(self.seq)
        if torn:  # a writer caught mid-line: the newline comes with the next append
            self.seq += 1
            tail = metric_line(self.seq, 7)
            data += tail[:-3]
            self.pending_tail = tail[-3:]
            self.ever[self.record_id].add(self.seq)
            self.torn_seq = self.seq
        with self.path.open("ab") as fh:
            if previous_tail:
                fh.write(previous_tail)
                self.complete[self.record_id].add(self.previous_torn_seq)
            fh.write(data)
        if torn:
            self.previous_torn_seq = self.torn_seq

    @rule()
    def replace(self) -> None:
        self.pending_tail = b""
        self._new_record()

    @rule()
    def restart(self) -> None:
        self.ledger.close()
        self._restart()

    @rule(
        plan=st.dictionaries(
            st.integers(1, 6), st.sampled_from(["before", "after", "refuse"]), max_size=3
        ),
        ledger_fault=st.sampled_from([None, None, "before", "after"]),
    )
    def sync_with_faults(self, plan: dict[int, str], ledger_fault: str | None) -> None:
        self.client.plan = {self.client.calls + k: v for k, v in plan.items()}
        self.ledger.fault = ledger_fault
        self._sync()
        self.client.plan = {}
        self.ledger.fault = None

    @rule()
    def sync(self) -> None:
        self._sync()

    # -- the model -----------------------------------------------------------------

    @invariant()
    def at_most_one_run_per_record(self) -> None:
        runs_of(self.client.real, self.experiment)  # raises on a duplicate

    def teardown(self) -> None:
        if not hasattr(self, "engine"):
            return
        try:
            self._sync()  # no faults: everything settles
            self._sync()
            runs = runs_of(self.client.real, self.experiment)
            current = runs.get(self.record_id)
            expected = self.complete[self.record_id]
            if expected or current is not None:
                assert current is not None, f"{self.record_id} has no run"
                points = self.client.real.get_metric_history(current.info.run_id, "m")
                steps = [p.step for p in points]
                assert len(steps) == len(set(steps)), f"duplicate points: {sorted(steps)}"
                assert set(steps) == expected, (sorted(set(steps)), sorted(expected))
            for record_id, run in runs.items():
                points = self.client.real.get_metric_history(run.info.run_id, "m")
                steps = [p.step for p in points]
                assert len(steps) == len(set(steps))
                assert set(steps) <= self.ever[record_id]
        finally:
            self.ledger.close()


def test_engine_equals_the_model_under_sink_and_ledger_faults(
    tmp_path: Path, mlflow_template: Path
) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    EngineModel.workdir = tmp_path
    EngineModel.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_state_machine_as_test(
        EngineModel,
        settings=settings(
            max_examples=20,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        ),
    )


@pytest.mark.parametrize(
    "faults",
    [
        {2: "after"},  # the reply to create_run lost in an experiment this process made
        {2: "before"},
        {3: "after"},  # the first log_batch applied, its reply lost
        {2: "refuse"},
    ],
)
def test_directed_faults_on_the_first_sync(
    tmp_path: Path, mlflow_template: Path, faults: dict[int, str]
) -> None:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    EngineModel.workdir = tmp_path
    EngineModel.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = EngineModel()
    model.setup()
    model.append([1, 2, 3], torn=False)
    model.sync_with_faults(faults, None)
    model.sync()
    model.at_most_one_run_per_record()
    model.teardown()
