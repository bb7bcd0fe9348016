"""An MLflow tracking server as sink, behind what a real deployment puts in front of it.

A reverse proxy (tests/fault_proxy.py) before the session's real ``mlflow server``
requires a bearer token or basic auth, terminates TLS with a certificate made by
trustme, or throttles with 429s. syncd only gets MLflow's own environment
variables; the tests check that the runs land once, that refused credentials are a
clear per-record failure and never a traceback, and that no secret reaches a log,
``syncd status``, ``/metrics`` or the ledger.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import SYNCD, SyncdProcess, wait_for
from fault_proxy import Fault, FaultProxy
from helpers import artifact_files, line, runs_by_record, started, write_record
from mlflow_server import MlflowServerProcess, unique_experiment

pytestmark = pytest.mark.slow

TOKEN = "tok-7c1d9e5a3b2f4061"
WRONG_TOKEN = "tok-0000wrong0000aa"
USER = "syncd-writer"
PASSWORD = "pw-Q8v3!kz72Lm"
WRONG_PASSWORD = "pw-notthisone-55"
SECRETS = (TOKEN, WRONG_TOKEN, PASSWORD, WRONG_PASSWORD)
STEPS = 30


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_records(root: Path, experiment: str, count: int = 3) -> dict[str, int]:
    """``count`` finished records with params, STEPS x 2 metric points and an artifact;
    returns points per record_id."""
    points = {}
    for i in range(count):
        rid = f"{experiment}-{i}"
        lines = [started(rid, experiment, run_name=f"r{i}"), line(1, "params", params={"i": i})]
        for step in range(STEPS):
            lines.append(
                line(2 + step, "metrics", step=step, metrics={"loss": 1 / (step + 1), "i": i})
            )
        lines.append(line(2 + STEPS, "artifact", path="notes.txt"))
        lines.append(line(3 + STEPS, "run_finished", status="FINISHED"))
        run_dir = root / f"r{i}"
        write_record(run_dir, lines)
        (run_dir / "notes.txt").write_text(f"notes of {rid}\n")
        points[rid] = 2 * STEPS
    return points


def assert_mirrored_once(client: Any, experiment: str, points: dict[str, int]) -> None:
    """One run per record (runs_by_record fails on a duplicate), every point once, the
    artifact uploaded through the server's proxied artifact store."""
    runs = runs_by_record(client, [experiment])
    assert set(runs) == set(points)
    for rid, run in runs.items():
        got = sum(len(client.get_metric_history(run.info.run_id, key)) for key in ("loss", "i"))
        assert got == points[rid], f"{rid}: {got} points, expected {points[rid]}"
        assert run.info.status == "FINISHED"
        assert artifact_files(client, run.info.run_id) == ["notes.txt"]


def syncd(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}
    return subprocess.run(
        [SYNCD, *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
        assert "View run" not in text, text[-3000:]  # MLflow's own URL prints stay out


def ledger_bytes(state: Path) -> str:
    return (state / "ledger.db").read_bytes().decode("latin-1")


@pytest.fixture
def direct(mlflow_server: MlflowServerProcess) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for 127.0.0.1 and the CA bundle that signed it."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    bundle = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return context, bundle


@pytest.fixture
def tls_proxy(
    mlflow_server: MlflowServerProcess, tls: tuple[ssl.SSLContext, Path]
) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port, tls=tls[0]) as proxy:
        yield proxy


def test_bearer_token_mirrors_and_a_wrong_token_fails_each_record_cleanly(
    workdir: Path, fault_proxy: FaultProxy, direct: Any
) -> None:
    experiment = unique_experiment("token")
    root = workdir / "runs"
    points = make_records(root, experiment)
    fault_proxy.require_authorization(f"Bearer {TOKEN}")
    state = workdir / ".syncd"
    args = ("backfill", str(root), "--tracking-uri", fault_proxy.url, "--state-dir", str(state))

    wrong = syncd(*args, "--json", cwd=workdir, env={"MLFLOW_TRACKING_TOKEN": WRONG_TOKEN})
    assert wrong.returncode == 1, wrong.stderr[-3000:]
    summary = json.loads(wrong.stdout)
    assert summary["failed"] == len(points) and summary["synced"] == 0
    reasons = {err["reason"] for err in summary["errors"]}
    assert all("refused syncd's credentials" in r and "MLFLOW_TRACKING_TOKEN" in r for r in reasons)
    assert fault_proxy.fault_count(Fault.UNAUTHORIZED) >= 1
    assert runs_by_record(direct, [experiment]) == {}
    status = syncd("status", "--state-dir", str(state), "--json", cwd=workdir, env={})
    failed = json.loads(status.stdout)
    assert "refused syncd's credentials" in json.dumps(failed)

    right = syncd(*args, cwd=workdir, env={"MLFLOW_TRACKING_TOKEN": TOKEN})
    assert right.returncode == 0, right.stderr[-3000:]
    assert_mirrored_once(direct, experiment, points)
    plain = syncd("status", "--state-dir", str(state), cwd=workdir, env={})
    assert_no_secret(
        wrong.stdout,
        wrong.stderr,
        right.stdout,
        right.stderr,
        status.stdout,
        plain.stdout,
        plain.stderr,
        ledger_bytes(state),
    )


def test_daemon_with_basic_auth_keeps_running_through_a_wrong_password(
    workdir: Path, fault_proxy: FaultProxy, direct: Any
) -> None:
    experiment = unique_experiment("basic")
    root = workdir / "runs"
    points = make_records(root, experiment, count=2)
    fault_proxy.require_authorization(basic(USER, PASSWORD))
    args = (str(root), "--tracking-uri", fault_proxy.url, "--state-dir", ".syncd")

    wrong = SyncdProcess(
        workdir,
        *args,
        env={"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": WRONG_PASSWORD},
    )
    try:
        wait_for(
            lambda: sum(e.get("event") == "record_failed" for e in wrong.log_events()) >= 2,
            60,
            0.2,
            "both records failed",
        )
        code, ready = wrong.health()
        assert code == 503 and "credentials" in json.dumps(ready)
        metrics = wrong.get("/metrics")[1]
        assert wrong.proc.poll() is None  # the daemon stays up
        assert wrong.stop() == 0
    finally:
        wrong.kill()

    right = SyncdProcess(
        workdir, *args, env={"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    )
    try:
        right.wait_ready()
        wait_for(
            lambda: assert_mirrored_once(direct, experiment, points) is None,
            60,
            0.5,
            "the records mirrored",
        )
        metrics += right.get("/metrics")[1] + json.dumps(right.health()[1])
        assert right.stop() == 0
    finally:
        right.kill()
    assert_no_secret(wrong.logs(), right.logs(), metrics, ledger_bytes(workdir / ".syncd"))


def test_tls_with_the_servers_ca_bundle(
    workdir: Path, tls_proxy: FaultProxy, tls: tuple[ssl.SSLContext, Path], direct: Any
) -> None:
    experiment = unique_experiment("tls")
    root = workdir / "runs"
    points = make_records(root, experiment, count=2)
    tls_proxy.require_authorization(f"Bearer {TOKEN}")
    assert tls_proxy.url.startswith("https://")
    args = ("backfill", str(root), "--tracking-uri", tls_proxy.url, "--json")

    untrusted = syncd(*args, cwd=workdir, env={"MLFLOW_TRACKING_TOKEN": TOKEN})
    assert untrusted.returncode == 1
    reasons = [err["reason"] for err in json.loads(untrusted.stdout)["errors"]]
    assert reasons and all("MLFLOW_TRACKING_SERVER_CERT_PATH" in r for r in reasons), reasons

    trusted = syncd(
        *args,
        cwd=workdir,
        env={"MLFLOW_TRACKING_TOKEN": TOKEN, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls[1])},
    )
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert_mirrored_once(direct, experiment, points)
    assert_no_secret(untrusted.stdout, untrusted.stderr, trusted.stdout, trusted.stderr)


def test_insecure_tls_switch_is_honoured(workdir: Path, tls_proxy: FaultProxy, direct: Any) -> None:
    experiment = unique_experiment("insecure")
    root = workdir / "runs"
    points = make_records(root, experiment, count=1)
    proc = syncd(
        "backfill",
        str(root),
        "--tracking-uri",
        tls_proxy.url,
        cwd=workdir,
        env={"MLFLOW_TRACKING_INSECURE_TLS": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_mirrored_once(direct, experiment, points)


def test_429s_are_waited_out_and_every_point_lands_once(
    workdir: Path, fault_proxy: FaultProxy, direct: Any
) -> None:
    experiment = unique_experiment("throttled")
    root = workdir / "runs"
    points = make_records(root, experiment, count=4)
    # every distinct call (creates, batches, uploads, lookups) is throttled once
    fault_proxy.throttle(path=r"^/api/2\.0/", retry_after="1", first_per_body=True)
    proc = syncd(
        "backfill",
        str(root),
        "--tracking-uri",
        fault_proxy.url,
        "--log-format",
        "json",
        cwd=workdir,
        env={},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    throttled = fault_proxy.fault_count(Fault.ERROR_429)
    assert throttled >= len(points) * 3  # at least the create, a batch and the upload of each
    assert_mirrored_once(direct, experiment, points)
    retries = [json.loads(raw) for raw in proc.stderr.splitlines() if '"sink_retry"' in raw]
    assert retries and all("429" in r["error"] for r in retries)
    # MLflow's REST client drops the reply's headers; syncd backs off from 0.5-1 s, not at once
    assert min(r["delay_s"] for r in retries) >= 0.5
