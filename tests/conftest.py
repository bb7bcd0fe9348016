"""Shared fixtures: a real SQLite MLflow store per test, cloned from a migrated template."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from mlflow_server import MlflowServerProcess
from moto_s3 import CLEARED, CREDENTIALS, Bucket, MotoServer

os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database (migrations take seconds; copy it)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory (MLflow puts ./mlruns artifacts in the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SYNCD_STATE_DIR", raising=False)
    return tmp_path


@pytest.fixture
def tracking_uri(workdir: Path, mlflow_template: Path) -> str:
    db = workdir / "mlflow.db"
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def client(tracking_uri: str) -> Iterator[object]:
    from mlflow.tracking import MlflowClient

    yield MlflowClient(tracking_uri=tracking_uri)


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
) -> Iterator[MlflowServerProcess]:
    """One real `mlflow server` for the session; tests isolate by experiment names."""
    server = MlflowServerProcess(tmp_path_factory.mktemp("mlflow-server"), mlflow_template)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(mlflow_server: MlflowServerProcess) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's `mlflow server`, passing through."""
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One `moto_server` process for the session: a real HTTP S3 endpoint on 127.0.0.1."""
    server = MotoServer(env=CREDENTIALS)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Test credentials and AWS_ENDPOINT_URL pointing at the session's moto server."""
    from syncd.sources.s3 import forget_clients

    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    forget_clients()
    yield moto_server.url
    forget_clients()


@pytest.fixture
def bucket(s3_env: str) -> Bucket:
    """A fresh, empty bucket on the moto server."""
    return Bucket(s3_env)
