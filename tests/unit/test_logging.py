"""syncd.logging: secrets never reach the logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from syncd.logging import configure, redact_text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide logging: put it back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


def test_redacts_password_in_a_database_uri() -> None:
    out = redact_text("connecting to postgresql://user:s3cret@host/db now")
    assert "s3cret" not in out
    assert "postgresql://user:" in out
    assert "@host/db now" in out


def test_redacts_password_in_an_http_uri() -> None:
    out = redact_text("tracking at http://u:p@host")
    assert out == "tracking at http://u:***@host"


def test_redacts_password_containing_a_slash() -> None:
    out = redact_text("store postgresql://user:ab/cd+ef=@host/db")
    assert "ab/cd" not in out
    assert "cd+ef=" not in out


def test_uri_without_password_is_unchanged() -> None:
    text = "http://host:5000/api and s3://bucket/prefix"
    assert redact_text(text) == text


def test_redacts_aws_access_key_ids() -> None:
    for key_id in ("AKIAIOSFODNN7EXAMPLE", "ASIA0123456789ABCDEF"):
        out = redact_text(f"key={key_id} region=eu-west-1")
        assert key_id not in out
        assert key_id[4:] not in out
        assert "region=eu-west-1" in out


def test_redacts_bearer_tokens() -> None:
    out = redact_text("Authorization: Bearer abc.def")
    assert "abc.def" not in out
    assert "Bearer" in out


def test_redacts_signed_url_signature() -> None:
    url = "https://b.s3.amazonaws.com/k?X-Amz-Date=20250101&X-Amz-Signature=deadbeef1234&a=1"
    out = redact_text(url)
    assert "deadbeef1234" not in out
    assert "X-Amz-Date=20250101" in out
    assert out.endswith("&a=1")


def test_redacts_signature_as_first_query_parameter() -> None:
    out = redact_text("GET /obj?X-Amz-Signature=0123abcd")
    assert "0123abcd" not in out


def test_json_log_line_holds_no_secret(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    structlog.get_logger("syncd.test").info(
        "x", password="hunter2", tracking_uri="http://u:pw@h", records=3
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "hunter2" not in lines[0]
    assert "pw@" not in lines[0]
    entry = json.loads(lines[0])
    assert entry["event"] == "x"
    assert entry["level"] == "info"
    assert entry["records"] == 3
    assert entry["password"] != "hunter2"
    assert entry["tracking_uri"].startswith("http://u:")
    assert entry["tracking_uri"].endswith("@h")


def test_stdlib_log_records_are_redacted_too(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    logging.getLogger("some.library").warning("retrying postgresql://app:topsecret@db/mlflow")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "topsecret" not in lines[0]
    assert json.loads(lines[0])["level"] == "warning"


def test_level_filters_lower_records(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(fmt="json", level="warning", stream=stream)
    log = structlog.get_logger("syncd.test")
    log.info("hidden")
    log.warning("shown")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["shown"]
