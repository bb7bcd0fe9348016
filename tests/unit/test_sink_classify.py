"""How MLflow's and requests' errors map to the sink's error tree, and the waits they get."""

from __future__ import annotations

import email.utils
import time

import pytest
import requests

from syncd.errors import (
    PermanentSinkError,
    SinkAccessDenied,
    ThrottledSinkError,
    TransientSinkError,
)
from syncd.redact import redact_text
from syncd.sink.calls import RetryPolicy, classify


def http_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    response.url = "https://mlflow.example/api/2.0/mlflow-artifacts/artifacts/x"
    return requests.HTTPError(f"{status} Client Error", response=response)


def mlflow_error(message: str, code: int) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException(message, error_code=code)


def test_refused_credentials_are_permanent_and_say_what_to_check() -> None:
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    for exc in (
        mlflow_error("failed with error code 401 != 200", UNAUTHENTICATED),
        mlflow_error("failed with error code 403 != 200", PERMISSION_DENIED),
        http_error(401),
        http_error(403),
    ):
        err = classify(exc)
        assert isinstance(err, SinkAccessDenied), exc
        assert "MLFLOW_TRACKING_TOKEN" in str(err)


def test_an_untrusted_certificate_names_the_setting_that_fixes_it() -> None:
    from mlflow.exceptions import MlflowException

    exc = MlflowException(
        "API request to https://mlflow:5000/api/2.0/mlflow/experiments/get-by-name failed"
        " with exception HTTPSConnectionPool(...): Max retries exceeded (Caused by SSLError("
        "SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed'"
    )
    err = classify(exc)
    assert isinstance(err, SinkAccessDenied)
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(err)


def test_429_is_throttling_with_the_servers_retry_after() -> None:
    err = classify(http_error(429, {"Retry-After": "7"}))
    assert isinstance(err, ThrottledSinkError) and err.retry_after == 7.0
    later = email.utils.formatdate(time.time() + 20, usegmt=True)
    dated = classify(http_error(429, {"Retry-After": later}))
    assert isinstance(dated, ThrottledSinkError)
    assert dated.retry_after is not None and 15 <= dated.retry_after <= 21
    # MLflow's REST client gives up on a 429 inside urllib3: no headers survive
    from mlflow.exceptions import MlflowException

    rest = classify(
        MlflowException(
            "API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception"
            " HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /x"
            " (Caused by ResponseError('too many 429 error responses'))"
        )
    )
    assert isinstance(rest, ThrottledSinkError) and rest.retry_after is None


def test_throttled_waits_are_bounded() -> None:
    policy = RetryPolicy(throttle_delay=1.0, max_retry_after=30.0)
    assert policy.delay(0, ThrottledSinkError("x", retry_after=3)) == 3
    assert policy.delay(0, ThrottledSinkError("x", retry_after=3600)) == 30.0
    for attempt in range(8):  # no Retry-After: at least half the doubling floor, at most the cap
        wait = policy.delay(attempt, ThrottledSinkError("x"))
        ceiling = min(30.0, 2.0**attempt)
        assert ceiling / 2 <= wait <= ceiling
    assert policy.delay(3, TransientSinkError("x")) <= 0.2 * 8


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_stay_transient(status: int) -> None:
    err = classify(http_error(status))
    assert isinstance(err, TransientSinkError) and not isinstance(err, ThrottledSinkError)


def test_other_client_errors_are_permanent() -> None:
    err = classify(http_error(404))
    assert isinstance(err, PermanentSinkError) and not isinstance(err, SinkAccessDenied)


def test_secret_values_from_the_environment_are_removed_even_bare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-bare-3141592")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-bare-2718281")
    text = "server said: token tok-bare-3141592 and syncd:pw-bare-2718281 are not valid"
    out = redact_text(text)
    assert "tok-bare-3141592" not in out and "pw-bare-2718281" not in out
    err = classify(mlflow_error("credentials 'tok-bare-3141592' refused", 1))
    assert "tok-bare-3141592" not in str(err)
