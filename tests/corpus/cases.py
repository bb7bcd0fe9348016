"""Bad-input corpus: builders for every case and the outcome the contract promises.

Most cases are a few lines of JSON and could live in files, but several cannot be
stored in git (FIFOs, device nodes, symlink loops, unreadable files, an 8 MiB
line), so every case is built here, from code, into a fresh root. Each case lives
in its own folder ``<root>/<name>/`` and says what must land in MLflow, which
errors are reported (line and a piece of the reason), and the record's state.

The outcomes come from docs/record-format.md, not from what the code happens to do.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import T0, artifact_files, history, line, started

RECORD = "run_record.jsonl"
MAX_LINE = 8 * 1024 * 1024
IS_ROOT = os.geteuid() == 0

Check = Callable[[Any, dict[str, Any]], None]  # (MlflowClient, runs by record_id)


@dataclass
class Case:
    name: str
    build: Callable[[Path], None]  # fills <root>/<name>/
    state: str | None  # ledger state; None: no record at all (not found as one)
    # (line, part of the reason); line None: a whole-record reason, whatever line it names
    errors: list[tuple[int | None, str]] = field(default_factory=list)
    check: Check | None = None  # what must be in MLflow
    record_dir: str = ""  # the record's folder below the case folder, if not the case folder
    skip: str | None = None  # why the case cannot run here
    needs: str | None = None  # what outside the pure parts it relies on

    @property
    def record_id(self) -> str:
        return f"c_{self.name}"

    def path(self, root: Path) -> Path:
        base = root / self.name
        return (base / self.record_dir if self.record_dir else base) / RECORD


def rid(name: str) -> str:
    return f"c_{name}"


def write(folder: Path, *lines: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD
    path.write_bytes(b"".join(x.encode() if isinstance(x, str) else x for x in lines))
    return path


def raw(**obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def finished(seq: int) -> str:
    return line(seq, "run_finished", status="FINISHED")


# -- checks -------------------------------------------------------------------------


def run_of(runs: dict[str, Any], name: str) -> Any:
    assert rid(name) in runs, f"no MLflow run for {rid(name)}"
    return runs[rid(name)]


def no_run(name: str) -> Check:
    def check(_client: Any, runs: dict[str, Any]) -> None:
        assert rid(name) not in runs

    return check


def metric_values(
    name: str, key: str, expected: list[float], *, status: str | None = None
) -> Check:
    def check(client: Any, runs: dict[str, Any]) -> None:
        run = run_of(runs, name)
        assert [v for _, _, v in history(client, run.info.run_id, key)] == expected
        if status is not None:
            assert run.info.status == status

    return check


def artifacts_are(name: str, expected: list[str]) -> Check:
    def check(client: Any, runs: dict[str, Any]) -> None:
        run = run_of(runs, name)
        assert artifact_files(client, run.info.run_id) == expected

    return check


# -- builders and cases ---------------------------------------------------------------


def _good(d: Path) -> None:
    write(
        d,
        started(rid("good")),
        line(1, "params", params={"lr": 0.1}),
        line(2, "metrics", metrics={"loss": 0.5}, step=0),
        finished(3),
    )


def _check_good(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "good")
    assert run.data.params == {"lr": "0.1"}
    assert history(client, run.info.run_id, "loss") == [(0, T0 + 2000, 0.5)]
    assert run.info.status == "FINISHED"


def _simple(name: str, *bad: str | bytes, after: int) -> Callable[[Path], None]:
    """run_started, the bad lines, then a metric ``a`` = 1.0 at seq ``after``."""

    def build(d: Path) -> None:
        write(d, started(rid(name)), *bad, line(after, "metrics", metrics={"a": 1.0}))

    return build


def _bom(d: Path) -> None:
    write(d, b"\xef\xbb\xbf", started(rid("bom")), line(1, "metrics", metrics={"a": 1.0}))


def _crlf(d: Path) -> None:
    lines = [started(rid("crlf")), line(1, "metrics", metrics={"a": 1.0}), finished(2)]
    write(d, *(x.replace("\n", "\r\n") for x in lines))


def _overlong(d: Path) -> None:
    big = raw(v=1, seq=1, ts=T0, type="tags", tags={"blob": "x" * (MAX_LINE + 100)})
    write(d, started(rid("overlong_line")), big, line(2, "metrics", metrics={"a": 1.0}))


def _nan_bare(d: Path) -> None:
    head = '{"v":1,"seq":%d,"ts":%d,"type":"metrics","metrics":{"a":%s}}\n'
    write(
        d,
        started(rid("nan_bare")),
        head % (1, T0, "NaN"),
        head % (2, T0, "Infinity"),
        head % (3, T0, "-Infinity"),
        line(4, "metrics", metrics={"a": 1.0}),
    )


def _nan_quoted(d: Path) -> None:
    metrics = {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": "nan", "e": "inf"}
    write(d, started(rid("nan_quoted")), line(1, "metrics", metrics=metrics))


def _check_nan_quoted(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "nan_quoted")
    values = {k: [v for _, _, v in history(client, run.info.run_id, k)] for k in "abcde"}
    assert len(values["a"]) == 1 and values["a"][0] != values["a"][0]  # NaN
    # MLflow's SQL store keeps +-inf as +-max float; either is "infinite" to a user.
    assert values["b"] in ([float("inf")], [1.7976931348623157e308])
    assert values["c"] in ([float("-inf")], [-1.7976931348623157e308])
    assert values["d"] == values["e"] == []


def _wrong_types(d: Path) -> None:
    write(
        d,
        started(rid("wrong_types")),
        raw(v=1, seq="1", ts=T0, type="tags", tags={"a": "b"}),
        raw(v=1, seq=2, ts="yesterday", type="tags", tags={"a": "b"}),
        line(3, "metrics", metrics=[1, 2]),
        line(4, "metrics", metrics={"a": 1.0}, step="3"),
        line(5, "params", params={"ok": 1, "bad": {"x": 1}}),
        line(6, "tags", tags={"t": 5, "ok": "y"}),
        line(7, "run_finished", status=3),
        finished(8),
    )


def _check_wrong_types(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "wrong_types")
    assert run.data.params == {"ok": "1"}
    assert run.data.tags["ok"] == "y" and "t" not in run.data.tags
    assert run.data.metrics == {}
    assert run.info.status == "FINISHED"


def _big_numbers(d: Path) -> None:
    digits = "1" * 5000
    write(
        d,
        started(rid("big_numbers")),
        '{"v":1,"seq":1,"ts":1,"type":"metrics","metrics":{"ok":1.5,"huge":D,"big":1e400}}\n'.replace(
            "D", digits
        ),
        '{"v":1,"seq":2,"ts":1,"type":"params","params":{"digits":D}}\n'.replace("D", digits),
        '{"v":1,"seq":D,"ts":1,"type":"tags","tags":{"a":"b"}}\n'.replace("D", digits),
        line(4, "metrics", metrics={"after": 2.0}),
    )


def _check_big_numbers(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "big_numbers")
    assert set(run.data.metrics) == {"ok", "after"}
    assert run.data.params == {"digits": "1" * 5000}
    assert "a" not in run.data.tags


def _seq(d: Path) -> None:
    write(
        d,
        started(rid("seq_gap_repeat")),
        line(1, "tags", tags={"first": "yes"}),
        line(3, "tags", tags={"gap": "yes"}),
        line(3, "tags", tags={"repeat": "yes"}),
        finished(4),
    )


def _check_seq(client: Any, runs: dict[str, Any]) -> None:
    tags = run_of(runs, "seq_gap_repeat").data.tags
    assert tags["first"] == "yes" and tags["gap"] == "yes" and "repeat" not in tags
    assert run_of(runs, "seq_gap_repeat").info.status == "FINISHED"


def _future(d: Path) -> None:
    write(
        d,
        started(rid("future_version")),
        line(1, "metrics", metrics={"a": 1.0}),
        raw(v=2, seq=2, ts=T0, type="metrics", metrics={"a": 2.0}),
        line(3, "metrics", metrics={"a": 3.0}, step=3),
    )


def _first_not_started(d: Path) -> None:
    write(
        d,
        line(0, "metrics", metrics={"a": 1.0}),
        line(1, "metrics", metrics={"a": 2.0}),
    )


def _dup(d: Path) -> None:
    write(d / "a", started(rid("duplicate_record_id")), line(1, "metrics", metrics={"a": 1.0}))
    write(d / "b", started(rid("duplicate_record_id")), line(1, "metrics", metrics={"b": 2.0}))


def _check_dup(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "duplicate_record_id")  # runs_by_record also refuses two runs
    assert set(run.data.metrics) == {"a"}, "the second file was merged into the first's run"
    assert run.data.tags["syncd.source"].endswith("/duplicate_record_id/a/" + RECORD)


def _names(d: Path) -> None:
    write(
        d,
        started(rid("refused_names")),
        line(1, "metrics", metrics={"bad@name": 1.0, "ok": 2.0, "": 3.0}),
        line(2, "params", params={"../x": "v", "p": "1"}),
        line(3, "tags", tags={"k" * 300: "v", "t": "ok"}),
    )


def _check_names(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "refused_names")
    assert set(run.data.metrics) == {"ok"}
    assert run.data.params == {"p": "1"}
    assert run.data.tags["t"] == "ok" and "k" * 300 not in run.data.tags


def _limits(d: Path) -> None:
    write(
        d,
        started(rid("over_limits")),
        line(1, "params", params={"long": "x" * 7000}),
        line(2, "tags", tags={"big": "y" * 9000}),
        line(3, "dataset", name="d", source="s3://bucket/key", digest="d" * 50),
        line(4, "metrics", metrics={"a": 1.0}, step=2**63),
        raw(v=1, seq=5, ts=2**63, type="metrics", metrics={"a": 2.0}),
        line(6, "metrics", metrics={"a": 3.0}, step=1),
    )


def _check_limits(client: Any, runs: dict[str, Any]) -> None:
    run = run_of(runs, "over_limits")
    assert run.data.params["long"].startswith("x" * 100)
    assert "truncated" in run.data.params["long"]
    assert "syncd/params/long.txt" in artifact_files(client, run.info.run_id)
    assert run.data.tags["big"] == "y" * 8000
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == ["d" * 36]
    assert history(client, run.info.run_id, "a") == [(1, T0 + 6000, 3.0)]


def _artifact_case(name: str, setup: Callable[[Path], str]) -> Callable[[Path], None]:
    """A record logging the artifact ``setup`` prepares, then a good ``ok.txt``."""

    def build(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "ok.txt").write_text("fine")
        bad = setup(d)
        write(
            d,
            started(rid(name)),
            line(1, "artifact", path=bad),
            line(2, "artifact", path="ok.txt"),
        )

    return build


def _outside_secret(d: Path) -> Path:
    secret = d.parent / "outside-secret.txt"
    secret.write_text("secret")
    return secret


def _setup_symlink_escape(d: Path) -> str:
    os.symlink(_outside_secret(d), d / "escape")
    return "escape"


def _setup_symlink_loop(d: Path) -> str:
    os.symlink("loop_a", d / "loop_b")
    os.symlink("loop_b", d / "loop_a")
    return "loop_a"


def _setup_fifo(d: Path) -> str:
    os.mkfifo(d / "pipe")
    return "pipe"


def _setup_dev_zero_link(d: Path) -> str:
    os.symlink("/dev/zero", d / "zero")
    return "zero"


def _mknod_works() -> bool:
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"syncd-mknod-probe-{os.getpid()}"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except OSError:
        return False
    probe.unlink()
    return True


def _setup_char_device(d: Path) -> str:
    os.mknod(d / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    return "zero"


def _setup_folder_fifo(d: Path) -> str:
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("a")
    os.mkfifo(d / "folder" / "pipe")
    return "folder"


def _setup_folder_loop(d: Path) -> str:
    (d / "folder" / "sub").mkdir(parents=True)
    (d / "folder" / "sub" / "a.txt").write_text("a")
    os.symlink("..", d / "folder" / "sub" / "up")
    return "folder"


def _setup_folder_link_escape(d: Path) -> str:
    """A symlinked sub-folder inside the run directory that holds a link outside."""
    (d / "folder").mkdir()
    (d / "other").mkdir()
    os.symlink(_outside_secret(d), d / "other" / "leak")
    os.symlink("../other", d / "folder" / "linked")
    return "folder"


def _tree_loop(d: Path) -> None:
    write(d, started(rid("tree_symlink_loop")), line(1, "metrics", metrics={"a": 1.0}))
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")  # the case folder again, forever
    os.symlink(str(d.parent), d / "sub" / "root")  # the whole corpus root


def _unreadable(d: Path) -> None:
    path = write(d, started(rid("unreadable_chmod")))
    path.chmod(0)


def _record_symlink_loop(d: Path) -> None:
    d.mkdir(parents=True)
    os.symlink(RECORD, d / RECORD)


def _empty(d: Path) -> None:
    write(d)


def _dir_named_record(d: Path) -> None:
    (d / RECORD).mkdir(parents=True)
    (d / RECORD / "inner.txt").write_text("not a record")


def _fifo_record(d: Path) -> None:
    d.mkdir(parents=True)
    os.mkfifo(d / RECORD)


def _partial(d: Path) -> None:
    full = line(1, "metrics", metrics={"a": 1.0})
    write(d, started(rid("partial_last_line")), full[:25])


def _check_partial(client: Any, runs: dict[str, Any]) -> None:
    assert run_of(runs, "partial_last_line").data.metrics == {}


def _bad_record_id(d: Path) -> None:
    write(
        d,
        line(0, "run_started", record_id="has space' OR 1=1", experiment="exp"),
        line(1, "metrics", metrics={"a": 1.0}),
    )


def _self_parent(d: Path) -> None:
    write(d, started(rid("self_parent"), parent_record_id=rid("self_parent")))


def _check_self_parent(client: Any, runs: dict[str, Any]) -> None:
    assert "mlflow.parentRunId" not in run_of(runs, "self_parent").data.tags


def _extension(d: Path) -> None:
    write(
        d,
        started(rid("unknown_and_extension")),
        line(1, "x-checkpoint", note="kept in the ledger"),
        line(2, "metrics", metrics={"a": 1.0}),
        line(3, "nonsense", x=1),  # a newer writer's type, or a mistake: never skipped
        line(4, "metrics", metrics={"a": 2.0}),
    )


def _late_started(d: Path) -> None:
    write(
        d,
        started(rid("late_run_started")),
        line(1, "run_started", record_id="other", experiment="exp"),
        line(2, "metrics", metrics={"a": 1.0}),
    )


def _check_late_started(client: Any, runs: dict[str, Any]) -> None:
    assert "other" not in runs
    metric_values("late_run_started", "a", [1.0])(client, runs)


ROOT_SKIP = "runs as root, which reads a chmod 000 file anyway (record_symlink_loop covers an open that fails)"
CONTAINMENT = "the engine marks a record it cannot read 'failed' instead of raising"
UNIQUE_ID = "the engine holds back a file whose record_id another live file owns"

CASES: list[Case] = [
    Case("good", _good, "synced", check=_check_good),
    Case(
        "invalid_json",
        _simple("invalid_json", "{not json\n", after=2),
        "error",
        [(2, "invalid JSON")],
        metric_values("invalid_json", "a", [1.0]),
    ),
    Case(
        "deep_nesting",
        _simple("deep_nesting", "[" * 100_000 + "\n", "{" * 100_000 + "\n", after=3),
        "error",
        [(2, "nested too deeply"), (3, "invalid JSON")],
        metric_values("deep_nesting", "a", [1.0]),
    ),
    Case(
        "non_utf8",
        _simple(
            "non_utf8", b'{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"k":"\xff\xfe"}}\n', after=2
        ),
        "error",
        [(2, "not valid UTF-8")],
        metric_values("non_utf8", "a", [1.0]),
    ),
    Case("bom", _bom, "synced", check=metric_values("bom", "a", [1.0])),
    Case("crlf", _crlf, "synced", check=metric_values("crlf", "a", [1.0], status="FINISHED")),
    Case(
        "overlong_line",
        _overlong,
        "error",
        [(2, f"line longer than {MAX_LINE} bytes")],
        metric_values("overlong_line", "a", [1.0]),
    ),
    Case(
        "nan_bare",
        _nan_bare,
        "error",
        [(2, "bare NaN"), (3, "bare Infinity"), (4, "bare -Infinity")],
        metric_values("nan_bare", "a", [1.0]),
    ),
    Case(
        "nan_quoted",
        _nan_quoted,
        "error",
        [(2, "metric 'd'"), (2, "metric 'e'")],
        _check_nan_quoted,
    ),
    Case(
        "wrong_types",
        _wrong_types,
        "error",
        [
            (2, "field 'seq'"),
            (3, "field 'ts'"),
            (4, "field 'metrics' must be an object"),
            (5, "field 'step'"),
            (6, "param 'bad'"),
            (7, "tag 't'"),
            (8, "field 'status' must be a string"),
        ],
        _check_wrong_types,
    ),
    Case(
        "big_numbers",
        _big_numbers,
        "error",
        [(2, "metric 'huge'"), (2, "metric 'big'"), (4, "field 'seq'")],
        _check_big_numbers,
    ),
    Case(
        "seq_gap_repeat",
        _seq,
        "error",
        [(3, "seq gap: expected 2, got 3"), (4, "seq 3 repeats")],
        _check_seq,
    ),
    Case(
        "unknown_and_extension",
        _extension,
        "blocked",
        [(4, "unknown event type 'nonsense'")],
        metric_values("unknown_and_extension", "a", [1.0]),
    ),
    Case(
        "future_version",
        _future,
        "blocked",
        [(3, "unsupported version 2")],
        metric_values("future_version", "a", [1.0]),
    ),
    Case(
        "first_not_run_started",
        _first_not_started,
        "error",
        [(1, "must be run_started"), (2, "no valid run_started")],
        no_run("first_not_run_started"),
    ),
    Case(
        "duplicate_record_id",
        _dup,
        "blocked",
        [(None, "is already used by")],
        _check_dup,
        record_dir="b",
        needs=UNIQUE_ID,
    ),
    Case(
        "refused_names",
        _names,
        "error",
        [(2, "'bad@name'"), (2, "must not be empty"), (3, "'../x'"), (4, "longer than 250")],
        _check_names,
    ),
    Case(
        "over_limits",
        _limits,
        "error",
        [
            (3, "truncated to MLflow's limit"),
            (4, "digest longer than 36"),
            (5, "field 'step'"),
            (6, "field 'ts'"),
        ],
        _check_limits,
    ),
    Case(
        "art_dotdot",
        _artifact_case("art_dotdot", lambda d: "../outside-secret.txt"),
        "error",
        [(2, "leaves the run directory")],
        artifacts_are("art_dotdot", ["ok.txt"]),
    ),
    Case(
        "art_absolute",
        _artifact_case("art_absolute", lambda d: "/etc/hostname"),
        "error",
        [(2, "absolute")],
        artifacts_are("art_absolute", ["ok.txt"]),
    ),
    Case(
        "art_symlink_escape",
        _artifact_case("art_symlink_escape", _setup_symlink_escape),
        "error",
        [(2, "symlink pointing outside")],
        artifacts_are("art_symlink_escape", ["ok.txt"]),
    ),
    Case(
        "art_symlink_loop",
        _artifact_case("art_symlink_loop", _setup_symlink_loop),
        "error",
        [(2, "symlink loop")],
        artifacts_are("art_symlink_loop", ["ok.txt"]),
    ),
    Case(
        "art_fifo",
        _artifact_case("art_fifo", _setup_fifo),
        "error",
        [(2, "is a FIFO")],
        artifacts_are("art_fifo", ["ok.txt"]),
    ),
    Case(
        "art_dev_zero_link",
        _artifact_case("art_dev_zero_link", _setup_dev_zero_link),
        "error",
        [(2, "symlink pointing outside")],
        artifacts_are("art_dev_zero_link", ["ok.txt"]),
    ),
    Case(
        "art_char_device",
        _artifact_case("art_char_device", _setup_char_device),
        "error",
        [(2, "character device")],
        artifacts_are("art_char_device", ["ok.txt"]),
        skip=None if _mknod_works() else "mknod is not permitted here",
    ),
    Case(
        "art_folder_with_fifo",
        _artifact_case("art_folder_with_fifo", _setup_folder_fifo),
        "error",
        [(2, "holds 'folder/pipe', a FIFO")],
        artifacts_are("art_folder_with_fifo", ["ok.txt"]),
    ),
    Case(
        "art_folder_with_loop",
        _artifact_case("art_folder_with_loop", _setup_folder_loop),
        "error",
        [(2, "symlink loop")],
        artifacts_are("art_folder_with_loop", ["ok.txt"]),
    ),
    Case(
        "art_folder_link_escape",
        _artifact_case("art_folder_link_escape", _setup_folder_link_escape),
        "error",
        [(2, "holds 'folder/linked/leak', a symlink pointing outside")],
        artifacts_are("art_folder_link_escape", ["ok.txt"]),
    ),
    Case(
        "art_missing",
        _artifact_case("art_missing", lambda d: "missing.txt"),
        "error",
        [(2, "does not exist")],
        artifacts_are("art_missing", ["ok.txt"]),
    ),
    Case(
        "tree_symlink_loop",
        _tree_loop,
        "synced",
        check=metric_values("tree_symlink_loop", "a", [1.0]),
    ),
    Case(
        "unreadable_chmod",
        _unreadable,
        "failed",
        [(None, "Permission denied")],
        no_run("unreadable_chmod"),
        skip=ROOT_SKIP if IS_ROOT else None,
        needs=CONTAINMENT,
    ),
    Case(
        "record_symlink_loop",
        _record_symlink_loop,
        "failed",
        [(None, "Too many levels of symbolic links")],
        needs=CONTAINMENT + "; syncd run's rescan stats records outside that containment",
    ),
    Case(
        "fifo_record",
        _fifo_record,
        "failed",
        [(None, "not a regular file (a FIFO)")],
        needs=CONTAINMENT,
    ),
    Case("empty_file", _empty, "pending"),
    Case("dir_named_record", _dir_named_record, None),
    Case("partial_last_line", _partial, "synced", check=_check_partial),
    Case(
        "not_an_object",
        _simple("not_an_object", "[1,2]\n", '"text"\n', "null\n", after=4),
        "error",
        [(2, "got array"), (3, "got string"), (4, "got null")],
        metric_values("not_an_object", "a", [1.0]),
    ),
    Case(
        "blank_and_nul_lines",
        _simple("blank_and_nul_lines", "\n", "   \n", "\x00\x00\n", after=1),
        "error",
        [(2, "invalid JSON"), (3, "invalid JSON"), (4, "invalid JSON")],
        metric_values("blank_and_nul_lines", "a", [1.0]),
    ),
    Case(
        "lone_surrogate",
        _simple(
            "lone_surrogate",
            '{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"k":"a\\ud800b"}}\n',
            after=2,
        ),
        "error",
        [(2, "unpaired UTF-16 surrogate")],
        metric_values("lone_surrogate", "a", [1.0]),
    ),
    Case(
        "bad_record_id",
        _bad_record_id,
        "error",
        [(1, "record_id"), (2, "no valid run_started")],
    ),
    Case(
        "self_parent",
        _self_parent,
        "error",
        [(1, "names the record itself")],
        _check_self_parent,
    ),
    Case(
        "late_run_started",
        _late_started,
        "error",
        [(2, "run_started must be seq 0")],
        _check_late_started,
    ),
]


def build_corpus(root: Path) -> list[Case]:
    """Every case that can run here, built under ``root``; returns those cases."""
    root.mkdir(parents=True, exist_ok=True)
    built = []
    for case in CASES:
        if case.skip:
            continue
        case.build(root / case.name)
        built.append(case)
    return built


def expected_run_count(cases: list[Case]) -> int:
    """Runs the corpus must produce: one per record whose run_started is valid."""
    no_runs = {
        "first_not_run_started",
        "unreadable_chmod",
        "record_symlink_loop",
        "fifo_record",
        "empty_file",
        "dir_named_record",
        "bad_record_id",
    }
    return sum(1 for case in cases if case.name not in no_runs)
