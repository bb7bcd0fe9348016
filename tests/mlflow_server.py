"""A real ``mlflow server`` in a subprocess, started from a pre-migrated SQLite store.

Used by the session fixture ``mlflow_server`` (tests/conftest.py). Tests sharing one
server isolate themselves by experiment names (see :func:`unique_experiment`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from daemon_helpers import free_port

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


class MlflowServerProcess:
    """``mlflow server`` with served artifacts on a free loopback port, in its own process group."""

    def __init__(
        self,
        folder: Path,
        template: Path | None = None,
        backend_store_uri: str | None = None,
        *,
        workers: int = 1,
    ) -> None:
        """A SQLite store in ``folder`` (cloned from ``template``), or ``backend_store_uri``
        (a PostgreSQL database: MLflow migrates it on start); ``workers`` server processes."""
        self.workers = workers
        self.folder = folder
        self.backend_store_uri = backend_store_uri
        self.db = folder / "mlflow.db"
        self.artifacts = folder / "artifacts"
        self.log_path = folder / "mlflow-server.log"
        self.port = free_port()
        self.template = template
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.backend_store_uri is None and self.template is not None and not self.db.exists():
            shutil.copy(self.template, self.db)  # migrations already applied: starts faster
        self.artifacts.mkdir(exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    MLFLOW,
                    "server",
                    "--backend-store-uri",
                    self.backend_store_uri or f"sqlite:///{self.db}",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(self.artifacts),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown kills the workers too
                # No background job runner: only tracking and artifacts are under test.
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mlflow server not healthy after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's process group, from /proc."""
        if self.proc is None:
            return 0.0
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.proc.pid:  # the process group (the server's session)
                total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (workers)
            os.killpg(proc.pid, signal.SIGKILL)


def unique_experiment(prefix: str) -> str:
    """An experiment name no other test on the shared server uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
