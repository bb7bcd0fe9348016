"""The source contract: every record source behaves the same behind ``RecordFile``.

Run over the local filesystem, over S3 (a real HTTP endpoint: moto's server) and
over the in-memory fake the engine's unit tests use (``tests/memory_source.py``):
discovery, stat, ranged reads, growth, replacement, deletion, artifact
resolution (files and folders, digests, staging) and confinement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from memory_source import MemorySource
from moto_s3 import Bucket, count_calls

from syncd.artifacts import ArtifactRefused, staged
from syncd.config import Root
from syncd.record.reader import Checkpoint, fingerprint_of, replaced_reason, tail_of
from syncd.sources import RecordFile
from syncd.sources.local import LocalRecord, find_records
from syncd.sources.s3 import S3Record, client_for, list_records


class Harness(Protocol):
    def write(self, rel: str, data: bytes) -> None: ...
    def delete(self, rel: str) -> None: ...
    def discover(self, pattern: str = ...) -> list[str]: ...
    def record(self, rel: str) -> RecordFile: ...


class LocalHarness:
    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()

    def discover(self, pattern: str = "**/run_record.jsonl") -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in find_records(self.root, pattern)]

    def record(self, rel: str) -> RecordFile:
        return LocalRecord(self.root / rel)


class S3Harness:
    def __init__(self, bucket: Bucket, prefix: str = "runs") -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client_for(Root(path=bucket.uri(prefix)))

    def write(self, rel: str, data: bytes) -> None:
        self.bucket.put(f"{self.prefix}/{rel}", data)

    def delete(self, rel: str) -> None:
        self.bucket.delete(f"{self.prefix}/{rel}")

    def discover(self, pattern: str = "**/run_record.jsonl") -> list[str]:
        base = len(self.prefix) + 1
        found = list_records(self.client, self.bucket.uri(self.prefix), pattern)
        return [obj.key[base:] for obj in found]

    def record(self, rel: str) -> RecordFile:
        return S3Record(self.client, self.bucket.name, f"{self.prefix}/{rel}")


@pytest.fixture(params=["local", "s3", "memory"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "local":
        yield LocalHarness(tmp_path / "runs")
    elif request.param == "memory":
        yield MemorySource()
    else:
        yield S3Harness(request.getfixturevalue("bucket"))


REC = "a/run_record.jsonl"
LINES = b'{"v":1,"seq":0}\n{"v":1,"seq":1}\n'


def test_discovery_applies_the_glob_at_any_depth(source: Harness) -> None:
    source.write("a/run_record.jsonl", LINES)
    source.write("b/c/run_record.jsonl", LINES)
    source.write("run_record.jsonl", LINES)
    source.write("b/notes.txt", b"x")
    source.write("b/run_record.jsonl.bak", LINES)
    assert sorted(source.discover()) == [
        "a/run_record.jsonl",
        "b/c/run_record.jsonl",
        "run_record.jsonl",
    ]
    assert source.discover("b/*/run_record.jsonl") == ["b/c/run_record.jsonl"]
    assert source.discover("*/run_record.jsonl") == ["a/run_record.jsonl"]


def test_stat_and_ranged_reads(source: Harness) -> None:
    source.write(REC, LINES)
    record = source.record(REC)
    size, mark = record.stat()
    assert size == len(LINES)
    assert record.read_at(0, 5) == LINES[:5]
    assert record.read_at(16, 16) == LINES[16:32]
    assert record.read_at(30, 100) == LINES[30:]  # short at the end, as pread
    assert record.read_at(len(LINES) + 10, 5) == b""
    assert record.uri.endswith(REC) and REC in record.display
    again = source.record(REC)
    assert again.stat() == (size, mark)  # unchanged: the same change mark


def test_growth_keeps_the_prefix_and_changes_the_mark(source: Harness) -> None:
    source.write(REC, LINES)
    first = source.record(REC).stat()
    grown = LINES + b'{"v":1,"seq":2}\n'
    source.write(REC, grown)
    record = source.record(REC)
    size, mark = record.stat()
    assert size == len(grown) and (size, mark) != first
    checkpoint = Checkpoint(
        offset=len(LINES),
        line=2,
        seq=1,
        fingerprint=fingerprint_of(LINES.split(b"\n")[0]),
        tail=tail_of(LINES.split(b"\n")[1]),
    )
    assert replaced_reason(record.read_at, size, checkpoint) is None
    assert record.read_at(len(LINES), size - len(LINES)) == b'{"v":1,"seq":2}\n'


def test_replacement_is_detected(source: Harness) -> None:
    source.write(REC, LINES)
    checkpoint = Checkpoint(
        offset=len(LINES),
        line=2,
        seq=1,
        fingerprint=fingerprint_of(LINES.split(b"\n")[0]),
        tail=tail_of(LINES.split(b"\n")[1]),
    )
    other = b'{"v":1,"seq":0,"x":1}\n{"v":1,"seq":1}\n{"v":1,"seq":2}\n'
    source.write(REC, other)
    record = source.record(REC)
    size, _ = record.stat()
    assert replaced_reason(record.read_at, size, checkpoint) is not None


def test_deletion_is_file_not_found(source: Harness) -> None:
    source.write(REC, LINES)
    source.delete(REC)
    with pytest.raises(FileNotFoundError):
        source.record(REC).stat()
    assert source.discover() == []


def _digest_of_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_artifact_file_and_folder_resolve_and_stage(source: Harness) -> None:
    source.write(REC, LINES)
    source.write("a/model.bin", b"weights" * 100)
    source.write("a/reports/index.html", b"<html/>")
    source.write("a/reports/img/plot.png", b"\x89PNG")
    record = source.record(REC)
    file = record.resolve_artifact("model.bin", None)
    assert not file.is_dir
    assert file == record.resolve_artifact("model.bin", None)  # stable digest
    with staged(file) as (local, digest):
        assert local.name == "model.bin" and local.read_bytes() == b"weights" * 100
        assert digest == file.digest
    assert not local.exists()  # staging is cleaned
    folder = record.resolve_artifact("reports", "out")
    assert folder.is_dir and folder.artifact_path == "out"
    with staged(folder) as (local, digest):
        assert local.name == "reports"
        assert _digest_of_tree(local) == {"index.html": b"<html/>", "img/plot.png": b"\x89PNG"}
        assert digest == folder.digest
    source.write("a/reports/index.html", b"<html>changed</html>")
    assert record.resolve_artifact("reports", "out").digest != folder.digest


@pytest.mark.parametrize(
    "path",
    ["../b/run_record.jsonl", "/etc/passwd", "reports/../../b/x", "missing.bin"],
)
def test_artifact_confinement(source: Harness, path: str) -> None:
    source.write(REC, LINES)
    source.write("b/run_record.jsonl", LINES)
    with pytest.raises(ArtifactRefused):
        source.record(REC).resolve_artifact(path, None)


def test_artifact_destination_is_confined(source: Harness) -> None:
    source.write(REC, LINES)
    source.write("a/model.bin", b"w")
    with pytest.raises(ArtifactRefused):
        source.record(REC).resolve_artifact("model.bin", "../elsewhere")


def test_s3_reads_are_pinned_to_the_stat_version(bucket: Bucket) -> None:
    harness = S3Harness(bucket)
    harness.write(REC, LINES)
    record = harness.record(REC)
    record.stat()
    harness.write(REC, b"x" * 40)
    with pytest.raises(OSError, match="replaced while being read"):
        record.read_at(0, 10)


def test_s3_listing_stat_costs_no_request(bucket: Bucket) -> None:
    harness = S3Harness(bucket)
    harness.write(REC, LINES)
    [listed] = list_records(harness.client, bucket.uri("runs"))
    calls = count_calls(harness.client)
    record = S3Record(harness.client, bucket.name, listed.key, listed)
    assert record.stat() == (listed.size, listed.mtime_ns)
    assert sum(calls.values()) == 0
    assert record.stat() == (listed.size, listed.mtime_ns)  # later stats ask S3 (HEAD)
    assert calls == {"HeadObject": 1}


def test_s3_artifact_digest_is_the_plain_md5_etag(bucket: Bucket) -> None:
    harness = S3Harness(bucket)
    harness.write(REC, LINES)
    harness.write("a/model.bin", b"weights")
    resolved = harness.record(REC).resolve_artifact("model.bin", None)
    assert resolved.digest == "md5:" + hashlib.md5(b"weights").hexdigest()


def test_s3_artifact_folder_key_that_is_not_a_plain_path_is_refused(bucket: Bucket) -> None:
    harness = S3Harness(bucket)
    harness.write(REC, LINES)
    harness.write("a/reports/ok.txt", b"ok")
    harness.write("a/reports/../../../escape.txt", b"no")
    with pytest.raises(ArtifactRefused, match="not a plain relative path"):
        harness.record(REC).resolve_artifact("reports", None)
