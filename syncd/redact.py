"""Secrets out of text: passwords in URIs, AWS keys, bearer tokens (stdlib only).

Used by the log pipeline and by every RecordError, so that a secret a record
happens to hold never reaches the ledger, ``syncd status`` or a summary.
"""

from __future__ import annotations

import re

# The password runs to the last '@' (passwords may hold '/'): redacting too much is safe.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@")
_AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:[\w.\-]*token|password|secret|signature|x-amz-signature|x-amz-credential"
    r"|x-amz-security-token)=)[^&\s]+"
)


def redact_text(text: str) -> str:
    """Remove passwords in URIs, AWS access keys, bearer tokens and signed-URL secrets."""
    text = _URI_PASSWORD.sub(r"\g<head>:***@", text)
    text = _AWS_KEY.sub(r"\1****************", text)
    text = _BEARER.sub(r"\1 ***", text)
    return _QUERY_SECRET.sub(r"\1***", text)
