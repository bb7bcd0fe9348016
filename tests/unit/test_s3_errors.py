"""S3's answers as one-line reasons naming what was asked (no traceback, no XML)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, CredentialRetrievalError, NoCredentialsError

from syncd.errors import SourceError
from syncd.sources.s3 import CREDENTIAL_CODES, describe_error, source_error

ROOT = "listing s3://ml-runs/team-a"


def answer(code: str, status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "S3's own words"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "ListObjectsV2",
    )


@pytest.mark.parametrize(
    ("code", "status", "says"),
    [
        ("ExpiredToken", 400, "the credentials have expired"),
        ("InvalidToken", 400, "the session token is not valid"),
        ("InvalidAccessKeyId", 403, "the access key is not valid"),
        ("SignatureDoesNotMatch", 403, "the secret key does not match the access key"),
        ("AccessDenied", 403, "access denied (check s3:ListBucket and s3:GetObject)"),
        ("NoSuchBucket", 404, "the bucket does not exist"),
    ],
)
def test_each_refusal_has_a_reason_naming_the_root(code: str, status: int, says: str) -> None:
    error = source_error(answer(code, status), ROOT)
    assert error.strerror is not None
    assert error.strerror.startswith(f"{ROOT}: {says}")
    assert error.strerror.endswith(f"({code})")
    assert error.code == code
    assert isinstance(error, SourceError) and isinstance(error, OSError)


def test_the_credential_refusals_make_the_client_anew() -> None:
    assert {"ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch"} <= CREDENTIAL_CODES
    assert not {"AccessDenied", "NoSuchBucket"} & CREDENTIAL_CODES


def test_an_unknown_code_keeps_s3s_message() -> None:
    assert describe_error(answer("SomethingNew"), ROOT) == f"{ROOT}: S3's own words (SomethingNew)"


def test_credentials_that_cannot_be_found_or_renewed() -> None:
    assert "no AWS credentials found" in describe_error(NoCredentialsError(), ROOT)
    renewing = CredentialRetrievalError(provider="sso", error_msg="token expired")
    assert "could not be obtained or renewed" in describe_error(renewing, ROOT)
