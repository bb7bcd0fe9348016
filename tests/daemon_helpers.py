"""Run `syncd run` as a real subprocess and talk to it like monitoring and systemd would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
SYNCD = str(Path(sys.executable).with_name("syncd"))


def run_syncd(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it, without SYNCD_* or MLFLOW_TRACKING_URI set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}
    return subprocess.run(
        [SYNCD, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}: {last!r}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class SyncdProcess:
    """`syncd run` in a subprocess with its own health port, logs kept for failures."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"syncd-{self.port}.log"
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))
        }
        full_env.update(env or {})
        self.args = [
            SYNCD,
            "run",
            *args,
            "--health-addr",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
        ]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.args, cwd=workdir, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.base + path)

    def health(self, path: str = "/readyz") -> tuple[int, dict[str, Any]]:
        code, body = self.get(path)
        return code, json.loads(body)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"syncd exited with {self.proc.returncode}:\n{self.logs()}")
            return self.get("/readyz")[0] == 200

        try:
            wait_for(ready, timeout, 0.1, "syncd /readyz")
        except AssertionError:
            print(self.logs())
            raise

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.logs().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"syncd did not stop within {timeout}s:\n{self.logs()}") from None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; keeps arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.messages.extend((now, field) for field in data.decode().split("\n"))

    def fields(self, prefix: str) -> list[float]:
        """Arrival times of the fields that start with ``prefix``."""
        return [t for t, f in list(self.messages) if f.startswith(prefix)]

    def times(self, field: str) -> list[float]:
        """Arrival times of exactly ``field``."""
        return [t for t, f in list(self.messages) if f == field]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
