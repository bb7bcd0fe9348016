"""deploy/: the systemd unit verifies and stays hardened; the example config loads."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "syncd.service"
MAX_EXPOSURE = 2.5

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not on PATH (install systemd to check the unit)",
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_systemd_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at a real one.
    executable = shutil.which("syncd") or sys.executable
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/opt/syncd/bin/syncd run --config /etc/syncd/config.yaml" in text
    copy = tmp_path / "syncd.service"
    copy.write_text(text.replace("ExecStart=/opt/syncd/bin/syncd", f"ExecStart={executable}"))

    result = analyze("verify", str(copy))
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if "syncd.service" in line], output


@needs_systemd_analyze
def test_unit_exposure_level() -> None:
    result = analyze("security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for syncd\.service: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    print(f"exposure level: {exposure}")
    assert exposure <= MAX_EXPOSURE, output


def test_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_config(DEPLOY / "config.example.yaml", env={})
    assert settings.health_addr == "127.0.0.1:9464"
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert settings.roots and settings.roots[0].path == "/data/runs"


def test_env_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SYNCD_* line of syncd.env.example (commented or not) is a valid setting."""
    monkeypatch.chdir(tmp_path)
    env: dict[str, str] = {}
    for line in (DEPLOY / "syncd.env.example").read_text(encoding="utf-8").splitlines():
        key, sep, value = line.lstrip("#").strip().partition("=")
        if sep and re.fullmatch(r"(SYNCD|MLFLOW|AWS)_[A-Z0-9_]+", key):
            env[key] = value.strip("'")
    assert "SYNCD_WATCH__MODE" in env
    settings = load_config(DEPLOY / "config.example.yaml", env=env)
    assert settings.watch.mode == env["SYNCD_WATCH__MODE"]
