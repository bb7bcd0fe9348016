"""The syncd: tracking store, driven through MLflow's own client (no mocks)."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _get_store

from syncd.record.events import Event
from syncd.record.reader import iter_events
from syncd.uri_store import INHERITED, SyncdStore


def events_of(path: Path) -> list[Event]:
    items = list(iter_events(path.read_bytes(), path=str(path)))
    assert [str(i) for i in items if not isinstance(i, Event)] == []
    return [i for i in items if isinstance(i, Event)]


def record_of(root: Path, run_id: str) -> Path:
    (path,) = root.glob(f"*/*-{run_id[:8]}/run_record.jsonl")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"syncd://{root}")


def test_absolute_and_relative_spellings_are_one_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = _get_store(f"syncd://{tmp_path}/runs")
    assert isinstance(absolute, SyncdStore)
    assert absolute.root == tmp_path / "runs"
    assert _get_store("syncd:runs") is absolute
    assert _get_store(f"syncd://{tmp_path}/./runs") is absolute


@pytest.mark.parametrize(
    ("env", "writes"),
    [
        ({"SYNCD_RANK_ZERO_ONLY": "1", "RANK": "1"}, False),
        ({"SYNCD_RANK_ZERO_ONLY": "1", "SLURM_PROCID": "3"}, False),
        ({"SYNCD_RANK_ZERO_ONLY": "true", "LOCAL_RANK": "2"}, False),
        ({"SYNCD_RANK_ZERO_ONLY": "1", "RANK": "0", "LOCAL_RANK": "1"}, True),
        ({"SYNCD_RANK_ZERO_ONLY": "0", "RANK": "1"}, True),
        ({"RANK": "1"}, True),
    ],
)
def test_rank_zero_only_writes_on_global_rank_zero_alone(
    root: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], writes: bool
) -> None:
    for name in ("SYNCD_RANK_ZERO_ONLY", "RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=f"syncd://{root}")
    exp_id = client.create_experiment("ddp")
    run = client.create_run(exp_id, run_name="train")
    assert len(run.info.run_id) == 32
    client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.5, 1, 0)], params=[Param("a", "1")])
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"a": "1"} and got.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
    assert root.exists() == writes
    if writes:
        assert events_of(record_of(root, run.info.run_id))[0].type == "run_started"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("syncd://host/runs", "three slashes"),
        ("syncd:gs://bucket/p", "takes a local root"),
        ("syncd:s3:///p", "names no bucket"),
        ("syncd:s3://bucket/a/../p", r"\.\. segments"),
    ],
)
def test_unsupported_uris_fail_clearly(uri: str, reason: str) -> None:
    with pytest.raises(MlflowException, match=reason):
        _get_store(uri)


def test_import_mlflow_does_not_import_the_store() -> None:
    code = "import sys, mlflow; print(sorted(m for m in sys.modules if m.startswith('syncd')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "syncd.mlflow_plugin" in out  # registered through the entry point
    assert "syncd.uri_store" not in out


def test_default_experiment_and_get_or_create(client: MlflowClient, root: Path) -> None:
    assert client.get_experiment("0").name == "Default"
    assert client.get_experiment_by_name("sweep") is None
    exp_id = client.create_experiment("sweep", tags={"team": "ranking"})
    assert client.get_experiment_by_name("sweep").experiment_id == exp_id
    with pytest.raises(MlflowException, match="already exists") as info:
        client.create_experiment("sweep")
    assert info.value.error_code == "RESOURCE_ALREADY_EXISTS"
    client.set_experiment_tag(exp_id, "owner", "ml")
    assert client.get_experiment(exp_id).tags == {"team": "ranking", "owner": "ml"}
    # another store on the same root (another process) sees the same ids
    other = SyncdStore(root)
    assert other.get_experiment_by_name("sweep").experiment_id == exp_id
    with pytest.raises(MlflowException, match="No experiment"):
        client.get_experiment("42")


def test_processes_racing_to_create_one_experiment_agree_on_it(root: Path) -> None:
    """mlflow.set_experiment: get by name, create when absent. When another process
    creates the name in between, MLflow drops the experiment it asked for (the run
    lands in "Default"); here the loser of the race joins the winner's experiment."""
    first, second = SyncdStore(root), SyncdStore(root)  # two training processes
    assert first.get_experiment_by_name("shared") is None
    assert second.get_experiment_by_name("shared") is None
    winner = second.create_experiment("shared")
    assert first.create_experiment("shared") == winner
    # without the race (nobody was told "absent"), creating a taken name still fails
    with pytest.raises(MlflowException, match="already exists"):
        first.create_experiment("shared")
    with pytest.raises(MlflowException, match="already exists"):
        SyncdStore(root).create_experiment("shared")


def test_run_lifecycle_writes_a_valid_record(client: MlflowClient, root: Path) -> None:
    exp_id = client.create_experiment("e/one")  # a name that is not a file name
    run = client.create_run(exp_id, tags={"git": "abc"})
    run_id = run.info.run_id
    assert len(run_id) == 32
    assert run.data.tags["mlflow.runName"] == run.info.run_name != ""
    assert run.info.artifact_uri.startswith("file://")
    client.log_param(run_id, "lr", 0.1)
    client.log_param(run_id, "lr", 0.1)  # the same value again is fine
    with pytest.raises(MlflowException, match="Changing param values"):
        client.log_param(run_id, "lr", 0.2)
    for step in range(5):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step, timestamp=1000 + step)
    client.log_metric(run_id, "odd", math.nan, step=0, timestamp=2000)
    client.set_tag(run_id, "phase", "train")
    client.log_batch(
        run_id,
        metrics=[Metric("a", 1.0, 3000, 7), Metric("b", 2.0, 3000, 7), Metric("a", 3.0, 3000, 7)],
        params=[Param("depth", "8")],
        tags=[RunTag("phase", "eval")],
    )
    history = client.get_metric_history(run_id, "loss")
    assert isinstance(_get_store(f"syncd://{root}").get_metric_history(run_id, "loss"), PagedList)
    assert [(m.step, m.timestamp, m.value) for m in history] == [
        (s, 1000 + s, 1.0 / (s + 1)) for s in range(5)
    ]
    client.update_run(run_id, name="renamed")
    client.set_terminated(run_id, "FAILED", end_time=9000)

    got = client.get_run(run_id)
    assert got.info.status == "FAILED"
    assert got.info.end_time == 9000
    assert got.info.run_name == "renamed"
    assert got.data.params == {"lr": "0.1", "depth": "8"}
    assert got.data.metrics["loss"] == 0.2
    assert math.isnan(got.data.metrics["odd"])
    assert got.data.metrics["a"] == 3.0
    assert got.data.tags["phase"] == "eval"
    assert got.data.tags["git"] == "abc"

    path = record_of(root, run_id)
    assert path.parent.parent.name == "e_one"
    events = events_of(path)
    assert events[0].fields["record_id"] == run_id
    assert events[0].fields["experiment"] == "e/one"
    assert [(e.type, e.fields.get("status")) for e in events][-1] == ("run_finished", "FAILED")
    assert events[-1].ts == 9000
    points = [(e.ts, e.fields["step"], e.fields["metrics"]) for e in events if e.type == "metrics"]
    assert points[-2:] == [(3000, 7, {"a": 1.0, "b": 2.0}), (3000, 7, {"a": 3.0})]
    assert sum(e.type == "params" for e in events) == 2

    # resuming the run appends run_resumed; a second store (process) reads the same run
    client.update_run(run_id, status="RUNNING")
    assert events_of(path)[-1].type == "run_resumed"
    assert SyncdStore(root).get_run(run_id).data.params["depth"] == "8"


def test_nested_run_names_its_parent(client: MlflowClient, root: Path) -> None:
    parent = client.create_run("0", run_name="sweep")
    child = client.create_run(
        "0", run_name="trial", tags={"mlflow.parentRunId": parent.info.run_id}
    )
    first = events_of(record_of(root, child.info.run_id))[0]
    assert first.fields["parent_record_id"] == parent.info.run_id
    assert "mlflow.parentRunId" not in first.fields["tags"]
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == (parent.info.run_id)
    found = client.search_runs(["0"])
    assert {r.info.run_id for r in found} == {parent.info.run_id, child.info.run_id}
    with pytest.raises(MlflowException, match="search_runs"):
        client.search_runs(["0"], filter_string="params.lr = '1'")


def test_unknown_run_and_unknown_experiment_fail(client: MlflowClient) -> None:
    with pytest.raises(MlflowException, match="not found"):
        client.get_run("0" * 32)
    with pytest.raises(MlflowException, match="no such experiment"):
        client.create_run("77")


def test_threads_logging_to_one_run_lose_nothing(client: MlflowClient, root: Path) -> None:
    run_id = client.create_run("0").info.run_id
    store = _get_store(f"syncd://{root}")

    def work(worker: int) -> None:
        for step in range(200):
            store.log_batch(run_id, [Metric(f"m{worker}", step, 5000 + step, step)], [], [])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = events_of(record_of(root, run_id))
    assert [e.seq for e in events] == list(range(len(events)))
    for w in range(8):
        assert [m.step for m in store.get_metric_history(run_id, f"m{w}")] == list(range(200))


def test_every_abstract_store_method_is_served_or_refused(root: Path) -> None:
    """No AbstractStore call returns None silently: each is implemented or raises."""
    store = SyncdStore(root)
    names = [
        n
        for n in dir(AbstractStore)
        if not n.startswith("_")
        and not isinstance(inspect.getattr_static(AbstractStore, n), property)
    ]
    assert len(names) > 100
    implemented, refused = [], []
    for name in names:
        own = SyncdStore.__dict__.get(name)
        if name in INHERITED:
            # inherited bodies that only delegate to implemented methods
            assert own is None
            implemented.append(name)
            continue
        assert own is not None, f"{name} is inherited from AbstractStore unchanged"
        if getattr(own, "_syncd_refused", False):
            with pytest.raises(MlflowException, match=f"{name} is not supported"):
                result = getattr(store, name)()
                if inspect.iscoroutine(result):
                    result.close()
            refused.append(name)
        else:
            implemented.append(name)
    for name in (
        "create_run",
        "log_batch",
        "get_run",
        "update_run_info",
        "log_inputs",
        "create_logged_model",
        "log_outputs",
        "get_logged_model",
        "finalize_logged_model",
        "set_logged_model_tags",
        "get_metric_history",
    ):
        assert name in implemented
    for name in ("delete_run", "start_trace", "search_logged_models"):
        assert name in refused


def test_delete_tag_records_a_tag_deletion(client: MlflowClient, root: Path) -> None:
    run_id = client.create_run("0", tags={"k": "v", "keep": "1"}).info.run_id
    client.delete_tag(run_id, "k")
    tags = client.get_run(run_id).data.tags
    assert "k" not in tags and tags["keep"] == "1"
    with pytest.raises(MlflowException, match="No tag with name: k"):
        client.delete_tag(run_id, "k")  # as MLflow's own stores answer
    events = events_of(record_of(root, run_id))
    assert [(e.type, e.fields) for e in events if e.type == "tag_deleted"] == [
        ("tag_deleted", {"key": "k"})
    ]


def test_registry_calls_made_directly_fail_saying_what_to_use(client: MlflowClient) -> None:
    import mlflow

    run_id = client.create_run("0").info.run_id
    model = client.create_logged_model("0", name="clf", source_run_id=run_id)
    client.finalize_logged_model(model.model_id, "READY")
    for call in (
        lambda: mlflow.register_model(f"models:/{model.model_id}", "ranker"),
        lambda: client.create_registered_model("ranker"),
        lambda: client.set_registered_model_alias("ranker", "prod", "1"),
    ):
        with pytest.raises(MlflowException, match=r"registered_model_name.*MLFLOW_REGISTRY_URI"):
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(client.tracking_uri)
            try:
                call()
            finally:
                mlflow.set_tracking_uri(previous)


def test_logged_models_are_read_back_from_the_records(client: MlflowClient, root: Path) -> None:
    from mlflow.entities import LoggedModelTag

    run_id = client.create_run("0").info.run_id
    with pytest.raises(MlflowException, match="inside a run"):
        client.create_logged_model("0", name="clf")
    model = client.create_logged_model("0", name="clf", source_run_id=run_id, model_type="x")
    assert model.artifact_location.startswith(record_of(root, run_id).parent.as_uri())
    client.finalize_logged_model(model.model_id, "READY")
    SyncdStore.set_logged_model_tags(
        _get_store(client.tracking_uri), model.model_id, [LoggedModelTag("stage", "eval")]
    )
    fresh = SyncdStore(root)  # another process: only the records to go by
    found = fresh.get_logged_model(model.model_id)
    assert (found.name, found.status.value, found.model_type) == ("clf", "READY", "x")
    assert found.tags == {"stage": "eval"} and found.source_run_id == run_id
    models = [e for e in events_of(record_of(root, run_id)) if e.type == "model"]
    assert [e.fields["tags"] for e in models] == [{}, {"stage": "eval"}]


def test_async_logging_through_the_fluent_api_loses_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"syncd://{root}")
    try:
        with mlflow.start_run() as run:
            mlflow.log_param("p", 1)
            for step in range(100):
                mlflow.log_metrics({"loss": step, "acc": -step}, step=step)
    finally:
        mlflow.set_tracking_uri(previous)
    events = events_of(record_of(root, run.info.run_id))
    steps = sorted(
        e.fields["step"] for e in events if e.type == "metrics" for _ in e.fields["metrics"]
    )
    assert steps == sorted(list(range(100)) * 2)
    assert events[-1].type == "run_finished"
