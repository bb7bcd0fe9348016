"""Configuration of s3:// roots, and anchors (state dir, SQLite store, ledger) kept local."""

from __future__ import annotations

import pytest

from syncd.config import load_config
from syncd.errors import ConfigError
from syncd.sources.s3 import glob_regex, split_uri


def test_s3_root_takes_endpoint_and_region() -> None:
    settings = load_config(
        None,
        overrides={
            "roots": [
                {
                    "path": "s3://bkt/runs",
                    "endpoint_url": "http://minio:9000",
                    "region": "eu-west-1",
                }
            ]
        },
        env={},
    )
    [root] = settings.roots
    assert root.is_s3 and root.endpoint_url == "http://minio:9000" and root.region == "eu-west-1"
    assert settings.watch.s3_poll_interval == 10.0


def test_endpoint_must_be_a_url_and_only_for_s3_roots(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_config(None, overrides={"roots": [{"path": "s3://bkt/r", "endpoint_url": "minio"}]})
    with pytest.raises(ConfigError, match="s3:// roots only"):
        load_config(None, overrides={"roots": [{"path": "/tmp", "region": "eu-west-1"}]}, env={})


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("state_dir", "s3://bkt/state", "local path such as /var/lib/syncd"),
        ("tracking_uri", "s3://bkt/mlflow.db", "artifact_root: s3://"),
        ("tracking_uri", "sqlite:///s3://bkt/mlflow.db", "local absolute SQLite path"),
        ("ledger_url", "sqlite:///s3://bkt/ledger.db", "postgresql://"),
    ],
)
def test_anchors_on_s3_are_refused_with_what_to_use(key: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, overrides={key: value}, env={})
    assert hint in str(info.value)


def test_split_uri() -> None:
    assert split_uri("s3://bkt/a/b/") == ("bkt", "a/b")
    assert split_uri("s3://bkt") == ("bkt", "")


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("**/run_record.jsonl", "run_record.jsonl", True),
        ("**/run_record.jsonl", "a/b/run_record.jsonl", True),
        ("**/run_record.jsonl", "a/b/run_record.jsonl.bak", False),
        ("*/run_record.jsonl", "a/run_record.jsonl", True),
        ("*/run_record.jsonl", "a/b/run_record.jsonl", False),
        ("**/*.jsonl", "x/y.jsonl", True),
        ("runs-[0-9]/**/r.jsonl", "runs-1/x/r.jsonl", True),
        ("runs-[0-9]/**/r.jsonl", "runs-a/x/r.jsonl", False),
    ],
)
def test_key_glob(pattern: str, key: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).fullmatch(key)) is matches
