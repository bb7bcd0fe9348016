"""A real HTTP S3 endpoint for tests: moto's server on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class MotoServer:
    """``moto_server`` in its own process (so it can be stopped and restarted on its port).

    A restart loses the buckets: tests that need them back re-create them.
    """

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        exe = str(Path(sys.executable).with_name("moto_server"))
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while not _answers(self.url + "/moto-api/"):
            if self.proc.poll() is not None:
                raise AssertionError(f"moto_server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError("moto_server did not answer")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reset(self) -> None:
        """Forget every bucket (moto's reset API)."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass


@dataclass
class Bucket:
    """A fresh bucket on the test endpoint, with a client that counts its requests."""

    endpoint: str
    name: str = field(default_factory=lambda: f"syncd-{uuid.uuid4().hex[:12]}")
    calls: Counter[str] = field(default_factory=Counter)
    client: Any = None

    def __post_init__(self) -> None:
        import boto3

        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        self.client.create_bucket(Bucket=self.name)

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def put(self, key: str, body: bytes | str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


def count_calls(client: Any) -> Counter[str]:
    """Count the S3 operations ``client`` sends from now on (GetObject, HeadObject, ...)."""
    counts: Counter[str] = Counter()

    def hook(model: Any, **_kw: Any) -> None:
        counts[model.name] += 1

    client.meta.events.register("before-call.s3", hook)
    return counts
