"""Secrets out of text: passwords in URIs, AWS keys, bearer tokens (stdlib only).

Used by the log pipeline and by every RecordError, so that a secret a record
happens to hold never reaches the ledger, ``syncd status`` or a summary.
"""

from __future__ import annotations

import os
import re

# The password runs to the LAST '@' of the authority (passwords may hold '@' and '/').
_URI_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<pw>[^\s]+)@(?=[^@\s]*(?:[/?#\s]|$))"
)
# key=value secrets: libpq DSNs (password=, sslpassword=), query strings and config dumps
# (api_key=, token=, client_secret=). Whole-word keys only: "max_tokens=512" stays.
_KEY_VALUE_SECRET = re.compile(
    r"(?i)\b((?:ssl)?password|passwd|pwd|secret|client_secret|secret_access_key"
    r"|aws_secret_access_key|(?:access|auth|refresh|session|security|id)_token|token"
    r"|api[_-]?key)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&;,]+)"
)
_AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:[\w.\-]*token|password|secret|signature|x-amz-signature|x-amz-credential"
    r"|x-amz-security-token)=)[^&\s]+"
)


# Secrets syncd's clients read from the environment: their values are removed wherever
# they appear, even bare (a server that quotes a refused token back in its error body).
SECRET_ENV = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
)
_MIN_SECRET_LEN = 6  # shorter values would blank out ordinary words


def redact_text(text: str) -> str:
    """Remove passwords in URIs, AWS access keys, bearer tokens, signed-URL secrets and
    the values of the secret environment variables (:data:`SECRET_ENV`)."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN and value in text:
            text = text.replace(value, "***")
    text = _URI_PASSWORD.sub(r"\g<head>:***@", text)
    text = _KEY_VALUE_SECRET.sub(r"\1\2***", text)
    text = _AWS_KEY.sub(r"\1****************", text)
    text = _BEARER.sub(r"\1 ***", text)
    return _QUERY_SECRET.sub(r"\1***", text)
