"""The fault proxy itself, against a real `mlflow server`: each mode does what it says."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import requests
from daemon_helpers import wait_for
from fault_proxy import Fault, FaultProxy
from mlflow_server import MlflowServerProcess, unique_experiment

API = "/api/2.0/mlflow"
CREATE_RUN = f"{API}/runs/create"
LOG_BATCH = f"{API}/runs/log-batch"


@pytest.fixture
def direct(mlflow_server: MlflowServerProcess) -> Any:
    """A client talking to the server itself, not through the proxy."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)


@pytest.fixture
def experiment_id(direct: Any) -> str:
    return str(direct.create_experiment(unique_experiment("proxy")))


def post(proxy: FaultProxy, path: str, body: dict[str, Any], timeout: float = 30) -> Any:
    return requests.post(proxy.url + path, json=body, timeout=timeout)


def runs_tagged(direct: Any, experiment_id: str, tag: str) -> list[Any]:
    return list(direct.search_runs([experiment_id], filter_string=f"tags.probe = '{tag}'"))


def test_pass_through_forwards_everything_and_counts_calls(
    fault_proxy: FaultProxy, direct: Any, experiment_id: str
) -> None:
    from mlflow.tracking import MlflowClient

    via = MlflowClient(tracking_uri=fault_proxy.url)
    run = via.create_run(experiment_id, tags={"probe": "pass"})
    via.log_metric(run.info.run_id, "m", 1.5, timestamp=7, step=3)
    [point] = direct.get_metric_history(run.info.run_id, "m")
    assert (point.value, point.timestamp, point.step) == (1.5, 7, 3)
    assert via.get_run(run.info.run_id).data.tags["probe"] == "pass"
    calls = fault_proxy.calls
    assert calls[CREATE_RUN] == 1 and calls[f"{API}/runs/log-metric"] == 1
    assert calls[f"{API}/runs/get"] == 1
    assert not fault_proxy.faults


def test_refused_connections_then_accepted_again(fault_proxy: FaultProxy) -> None:
    port = fault_proxy.port
    fault_proxy.refuse()
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(fault_proxy.url + "/health", timeout=5)
    assert "refused" in str(info.value).lower()
    assert fault_proxy.calls == {}  # nothing reached the proxy

    fault_proxy.accept()
    assert fault_proxy.port == port
    assert requests.get(fault_proxy.url + "/health", timeout=5).status_code == 200

    fault_proxy.refuse(reset=True)  # listening, but every connection is reset
    with pytest.raises(requests.ConnectionError, match=r"(?i)reset|aborted"):
        requests.get(fault_proxy.url + "/health", timeout=5)
    assert fault_proxy.fault_count(Fault.REFUSED) == 1
    assert fault_proxy.calls == {"/health": 1}  # only the call made while accepting
    fault_proxy.pass_through()
    assert requests.get(fault_proxy.url + "/health", timeout=5).status_code == 200


def test_lost_reply_means_a_client_error_but_the_server_has_the_run(
    fault_proxy: FaultProxy, direct: Any, experiment_id: str
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    fault_proxy.lose_replies(path=r"/runs/create$")
    via = MlflowClient(tracking_uri=fault_proxy.url)
    with pytest.raises(MlflowException, match=r"(?i)connection"):
        via.create_run(experiment_id, tags={"probe": "lost"})
    assert len(runs_tagged(direct, experiment_id, "lost")) == 1  # applied upstream
    assert fault_proxy.fault_count(Fault.LOSE_REPLY, CREATE_RUN) == 1
    # other paths are not affected
    assert via.get_experiment(experiment_id).experiment_id == experiment_id


def test_lost_reply_once_per_body_lets_the_retry_through(
    fault_proxy: FaultProxy, direct: Any, experiment_id: str
) -> None:
    fault_proxy.lose_replies(path=r"/runs/create$", first_per_body=True)
    body = {"experiment_id": experiment_id, "tags": [{"key": "probe", "value": "retry"}]}
    with pytest.raises(requests.ConnectionError):
        post(fault_proxy, CREATE_RUN, body)
    assert post(fault_proxy, CREATE_RUN, body).status_code == 200  # the same call again: passes
    other = {**body, "start_time": 1}
    with pytest.raises(requests.ConnectionError):  # a different call: its first reply is lost
        post(fault_proxy, CREATE_RUN, other)
    assert len(runs_tagged(direct, experiment_id, "retry")) == 3  # a naive retry duplicates
    assert fault_proxy.fault_count(Fault.LOSE_REPLY) == 2
    assert fault_proxy.calls[CREATE_RUN] == 3


def test_503_on_every_second_matching_call(
    fault_proxy: FaultProxy, direct: Any, experiment_id: str
) -> None:
    run_id = direct.create_run(experiment_id).info.run_id
    fault_proxy.fail_with_503(every=2, path=r"/runs/log-batch$")
    codes = []
    for step in range(6):
        body = {
            "run_id": run_id,
            "metrics": [{"key": "m", "value": float(step), "timestamp": step, "step": step}],
        }
        resp = post(fault_proxy, LOG_BATCH, body)
        codes.append(resp.status_code)
        if resp.status_code == 503:
            assert resp.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert codes == [200, 503, 200, 503, 200, 503]
    steps = sorted(m.step for m in direct.get_metric_history(run_id, "m"))
    assert steps == [0, 2, 4]  # a 503 never reached the server
    # a path the rule does not match is never refused
    for _ in range(3):
        assert requests.get(f"{fault_proxy.url}/health", timeout=5).status_code == 200
    assert fault_proxy.fault_count(Fault.ERROR_503, LOG_BATCH) == 3
    assert fault_proxy.calls[LOG_BATCH] == 6


def test_stall_holds_calls_until_released(
    fault_proxy: FaultProxy, direct: Any, experiment_id: str
) -> None:
    fault_proxy.stall(path=r"/runs/create$")
    body = {"experiment_id": experiment_id, "tags": [{"key": "probe", "value": "stalled"}]}
    result: dict[str, Any] = {}

    def call() -> None:
        result["status"] = post(fault_proxy, CREATE_RUN, body, timeout=60).status_code

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    wait_for(lambda: fault_proxy.held == 1, 10, what="the call to be held")
    # held before forwarding: the server has not seen it, the client has no answer
    assert runs_tagged(direct, experiment_id, "stalled") == []
    assert worker.is_alive()
    # other paths go through meanwhile
    assert requests.get(f"{fault_proxy.url}/health", timeout=5).status_code == 200

    fault_proxy.release()
    worker.join(30)
    assert result == {"status": 200}
    assert len(runs_tagged(direct, experiment_id, "stalled")) == 1
    assert fault_proxy.held == 0 and fault_proxy.fault_count(Fault.STALL, CREATE_RUN) == 1


def test_timed_stall_delays_then_forwards(fault_proxy: FaultProxy) -> None:
    fault_proxy.stall(seconds=1.0, path=r"^/health$")
    started = time.monotonic()
    assert requests.get(f"{fault_proxy.url}/health", timeout=30).status_code == 200
    assert time.monotonic() - started >= 1.0
    fault_proxy.pass_through()
    started = time.monotonic()
    assert requests.get(f"{fault_proxy.url}/health", timeout=30).status_code == 200
    assert time.monotonic() - started < 1.0
