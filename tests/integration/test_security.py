"""Security properties as tests: loopback health endpoint, no secret in any output, 0700 state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from daemon_helpers import SYNCD, http_get, run_syncd, wait_for
from helpers import line, started, write_record

from syncd.config import DEFAULT_HEALTH_ADDR, load_config

PASSWORD = "s3cretPassw0rd"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
TOKEN = "tok-9f8e7d6c5b4a"
SECRETS = (PASSWORD, AWS_KEY, AWS_SECRET, TOKEN)


def assert_no_secret(*outputs: str) -> None:
    for text in outputs:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked:\n{text[-3000:]}"


def secret_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": AWS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "MLFLOW_TRACKING_TOKEN": TOKEN,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }


def syncd_with(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}
    return subprocess.run(
        [SYNCD, *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def secret_record(root: Path) -> None:
    write_record(
        root / "r",
        [
            started("sec1", tags={"aws": f"key={AWS_KEY}"}),
            # a bad entry whose reason quotes the value
            line(1, "metrics", metrics={"leak": f"{AWS_KEY}"}),
            line(2, "tags", tags={"uri": f"http://user:{PASSWORD}@host/"}),
            line(3, "metrics", metrics={"bad@uri": 1.0, f"http://u:{PASSWORD}@h": 2.0}),
        ],
    )


def test_health_endpoint_binds_loopback_by_default(workdir: Path, tracking_uri: str) -> None:
    settings = load_config(None, overrides={}, env={})
    assert settings.health_addr == DEFAULT_HEALTH_ADDR
    assert settings.health_endpoint is not None and settings.health_endpoint[0] == "127.0.0.1"

    _host, port = DEFAULT_HEALTH_ADDR.rsplit(":", 1)
    with socket.socket() as probe:  # the real default port, if nothing else holds it
        try:
            probe.bind(("127.0.0.1", int(port)))
        except OSError:
            pytest.skip(f"port {port} is in use here; the default is checked in the config only")
    root = workdir / "runs"
    write_record(root / "r", [started("h1")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}
    log = (workdir / "run.log").open("w")
    proc = subprocess.Popen(
        [SYNCD, "run", str(root), "--tracking-uri", tracking_uri, "--log-format", "json"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200,
            60,
            0.2,
            "syncd run on the default health address",
        )
        listening = listening_addresses(int(port))
        assert listening == {"127.0.0.1"}, listening
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (IPv4 and IPv6), from /proc/net."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) != port or fields[3] != "0A":
                continue
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
            else:
                raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8))
                found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def test_no_secret_in_backfill_or_status_output(workdir: Path, tracking_uri: str) -> None:
    root = workdir / "runs"
    secret_record(root)
    env = secret_env()
    backfill = syncd_with(
        env,
        "backfill",
        str(root),
        "--tracking-uri",
        tracking_uri,
        "--json",
        "--log-level",
        "debug",
        cwd=workdir,
    )
    assert backfill.returncode == 1, backfill.stderr
    summary = json.loads(backfill.stdout)
    assert summary["errors"]  # the bad entries were reported...
    status = syncd_with(env, "status", "--tracking-uri", tracking_uri, "--json", cwd=workdir)
    plain = syncd_with(env, "status", "--tracking-uri", tracking_uri, cwd=workdir)
    assert json.loads(status.stdout)["records_with_errors"]
    # ...without quoting a secret anywhere a person or a log collector reads
    assert_no_secret(
        backfill.stdout,
        backfill.stderr,
        status.stdout,
        status.stderr,
        plain.stdout,
        plain.stderr,
    )


@pytest.mark.slow
def test_no_password_from_an_unreachable_tracking_uri(workdir: Path) -> None:
    root = workdir / "runs"
    secret_record(root)
    uri = f"http://user:{PASSWORD}@127.0.0.1:1/"
    env = secret_env()
    backfill = syncd_with(env, "backfill", str(root), "--tracking-uri", uri, "--json", cwd=workdir)
    assert backfill.returncode == 1
    assert "Traceback" not in backfill.stderr
    summary = json.loads(backfill.stdout)
    assert summary["waiting"] == 1 and summary["synced"] == 0  # MLflow is unreachable
    assert "user:***@127.0.0.1:1" in summary["tracking_uri"]
    status = syncd_with(env, "status", "--tracking-uri", uri, "--json", cwd=workdir)
    assert_no_secret(backfill.stdout, backfill.stderr, status.stdout, status.stderr)


def test_no_password_from_an_unreachable_ledger(workdir: Path, tracking_uri: str) -> None:
    pytest.importorskip("psycopg")
    config = workdir / "syncd.yaml"
    config.write_text(
        f"ledger_url: postgresql+psycopg://syncd:{PASSWORD}@127.0.0.1:1/syncd\n"
        f"tracking_uri: {tracking_uri}\n"
    )
    root = workdir / "runs"
    secret_record(root)
    env = secret_env()
    outs = []
    for args in (("status", "--json"), ("status",), ("backfill", str(root), "--json")):
        proc = syncd_with(env, *args, "--config", str(config), cwd=workdir)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr
        outs += [proc.stdout, proc.stderr]
    assert_no_secret(*outs)


def test_state_dir_is_private(workdir: Path, tracking_uri: str) -> None:
    root = workdir / "runs"
    write_record(root / "r", [started("p1")])
    state = workdir / "fresh" / "state"
    proc = run_syncd(
        "backfill",
        str(root),
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(state),
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    assert (state / "ledger.db").exists()
    assert oct(state.stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.slow
def test_the_daemon_log_holds_no_secret(workdir: Path, tracking_uri: str) -> None:
    from daemon_helpers import SyncdProcess

    root = workdir / "runs"
    secret_record(root)
    proc = SyncdProcess(workdir, str(root), "--tracking-uri", tracking_uri, env=secret_env())
    try:
        proc.wait_ready()
        wait_for(
            lambda: any(e.get("event") == "record_error" for e in proc.log_events()),
            60,
            0.2,
            "the bad entries logged",
        )
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert_no_secret(proc.logs())
