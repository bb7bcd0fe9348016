"""Data generation, process timing and the report shared by the benchmarks."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import random
import resource
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYNCD = str(Path(sys.executable).with_name("syncd"))
BASELINE_SCRIPT = HERE / "baseline_log_batch.py"
T0 = 1_763_800_000_000  # epoch ms of every generated record's run_started


# -- records ---------------------------------------------------------------------------


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n"


def write_training_record(
    run_dir: Path,
    *,
    index: int,
    steps: int,
    metric_keys: tuple[str, ...],
    experiment: str,
    seed: int = 0,
    tags_event: bool = True,
) -> int:
    """One record in the v1 format, as ``RunRecorder`` writes it: started, params,
    (tags), one ``metrics`` event per step, finished. Returns the metric points written."""
    rng = random.Random(seed * 1_000_003 + index)
    run_dir.mkdir(parents=True, exist_ok=True)
    ts = T0 + index * 10_000_000
    seq = 0
    out: list[str] = []

    def event(etype: str, **fields: Any) -> None:
        nonlocal seq
        out.append(_line({"v": 1, "seq": seq, "ts": ts, "type": etype, **fields}))
        seq += 1

    event(
        "run_started",
        record_id=f"bench{seed:02d}{index:06d}{rng.getrandbits(48):012x}",
        experiment=experiment,
        run_name=f"trial-{index}",
        tags={
            "mlflow.user": "bench",
            "mlflow.source.name": "train.py",
            "mlflow.source.type": "LOCAL",
            "git_sha": f"{rng.getrandbits(28):07x}",
        },
    )
    ts += 50
    event(
        "params",
        params={
            "lr": round(10 ** rng.uniform(-4, -1), 6),
            "depth": rng.randint(2, 12),
            "optimizer": rng.choice(["adam", "sgd", "adamw"]),
            "batch_size": rng.choice([32, 64, 128, 256]),
            "dropout": round(rng.uniform(0, 0.5), 3),
        },
    )
    if tags_event:
        event("tags", tags={"team": "ranking", "trial": str(index)})
    points = 0
    base = {key: rng.uniform(0.5, 2.0) for key in metric_keys}
    for step in range(steps):
        ts += 1000
        decay = math.exp(-step / max(steps / 3, 1))
        values = {
            key: base[key] * decay + rng.gauss(0, 0.01) if i % 2 == 0 else 1 - base[key] * decay / 2
            for i, key in enumerate(metric_keys)
        }
        event("metrics", step=step, metrics=values)
        points += len(values)
    ts += 1000
    event("run_finished", status="FINISHED")
    (run_dir / "run_record.jsonl").write_text("".join(out), encoding="utf-8")
    return points


def make_tree(
    root: Path,
    *,
    records: int,
    steps: int,
    metric_keys: tuple[str, ...],
    experiments: int = 1,
    seed: int = 0,
    fanout: int = 0,
    tags_event: bool = True,
    experiment_prefix: str = "bench-exp",
) -> int:
    """``records`` records under ``root`` (grouped ``fanout`` per folder when > 0);
    returns the metric points written."""
    points = 0
    for i in range(records):
        sub = root / f"group-{i // fanout:04d}" if fanout else root
        points += write_training_record(
            sub / f"run-{i:06d}",
            index=i,
            steps=steps,
            metric_keys=metric_keys,
            experiment=f"{experiment_prefix}-{i % experiments}",
            seed=seed,
            tags_event=tags_event,
        )
    return points


# -- processes -------------------------------------------------------------------------


def clean_env(pycache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a measured process: no SYNCD_* / MLFLOW_TRACKING* leaking in.

    With ``pycache``, bytecode is cached under that folder (PYTHONPYCACHEPREFIX) even
    when the caller's environment sets PYTHONDONTWRITEBYTECODE: an installed package
    has its .pyc files, and without them every process would spend seconds compiling
    MLflow, which would measure the environment rather than the tools.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}
    env.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
        env["PYTHONDONTWRITEBYTECODE"] = ""  # empty = unset for Python
    env.update(extra)
    return env


@dataclass
class Timed:
    wall_s: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float | None = None


def run_timed(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run a command to completion, timing the whole process (start-up and imports included)."""
    started = time.perf_counter()
    proc = subprocess.run(
        args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    return Timed(wall, proc.returncode, proc.stdout, proc.stderr)


_RSS_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "rc": p.returncode, "maxrss_kb": ru.ru_maxrss,
                  "stdout": p.stdout, "stderr": p.stderr[-4000:]}))
"""


def run_with_peak_rss(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run a command inside a fresh wrapper process whose only child it is, so the
    wrapper's RUSAGE_CHILDREN ru_maxrss is exactly the command's peak RSS."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(proc.stdout)
    return Timed(
        data["wall_s"], data["rc"], data["stdout"], data["stderr"], data["maxrss_kb"] / 1024
    )


def parse_json_summary(stdout: str) -> dict[str, Any]:
    """The ``syncd backfill --json`` summary document on stdout."""
    start = stdout.find("{")
    assert start >= 0, f"no JSON summary on stdout: {stdout[-2000:]!r}"
    return dict(json.loads(stdout[start:]))


def count_rows(db: Path, table: str = "metrics") -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute(f"select count(*) from {table}").fetchone()[0])


# -- the report ------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    passed: bool | None = None  # None: informational
    benchmark: str = ""


@dataclass
class Report:
    path: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        print(f"  note: {text}")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")

    def add(
        self,
        benchmark: str,
        figure: str,
        value: float | int | str | None,
        unit: str = "",
        target: str = "",
        passed: bool | None = None,
    ) -> None:
        row = Row(figure, value, unit, target, passed, benchmark)
        self.rows.append(row)
        tail = f"  (target {target}: {_verdict(passed)})" if target else ""
        print(f"  [{benchmark}] {figure}: {_fmt(value)} {unit}".rstrip() + tail)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "machine": machine_info(),
            "all_passed": all(r.passed is not False for r in self.rows),
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }

    def table(self) -> str:
        info = machine_info()
        head = (
            f"syncd benchmarks  started {self.started}, ended {info['date']}\n"
            f"platform: {info['platform']}  python {info['python']}\n"
            f"cpu: {info['cpu_model']} x{info['cpus']}  load avg at end: {info['loadavg']}"
        )
        cols = ("benchmark", "figure", "value", "target", "result")
        body = [
            (
                r.benchmark,
                r.figure,
                f"{_fmt(r.value)} {r.unit}".strip(),
                r.target,
                _verdict(r.passed),
            )
            for r in self.rows
        ]
        widths = [
            max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)
        ]
        sep = "  ".join("-" * w for w in widths)
        lines = [head, sep, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), sep]
        lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
        lines.append(sep)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value: float | int | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "FAIL")


def cpu_model() -> str:
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.lower().startswith("model name"):
                return raw.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "maxrss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default
