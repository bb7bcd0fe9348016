"""``LogBatch`` to a tracking server, built as JSON directly.

``MlflowClient.log_batch`` over HTTP turns each point into an entity, the
entities into protobuf messages, the messages into a JSON string, parses that
string back into a dict and lets ``requests`` encode it again: with 1,000 points
per call that is most of a writer's CPU time, on cores the server and its
database share. This sends the same request (the documented REST endpoint, the
same host credentials, TLS settings, timeouts and error replies, through
MLflow's own ``http_request``) from plain dicts. Where the client's store is not
a ``RestStore`` (any other scheme), there is no such path and the client is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from syncd.projection import Entry, MetricPoint

LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def rest_store_of(client: Any) -> Any | None:
    """The client's ``RestStore``, or None when it writes anywhere but a tracking server."""
    from mlflow.store.tracking.rest_store import RestStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if isinstance(store, RestStore) else None


def _double(value: float) -> float | str:
    """A double as protobuf's JSON mapping spells it (NaN and the infinities as strings)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else _NON_FINITE[value]


def log_batch_body(
    run_id: str,
    metrics: Sequence[MetricPoint],
    params: Sequence[Entry],
    tags: Sequence[Entry],
) -> dict[str, Any]:
    body: dict[str, Any] = {"run_id": run_id}
    if metrics:
        body["metrics"] = [
            {"key": m.key, "value": _double(m.value), "timestamp": m.timestamp, "step": m.step}
            for m in metrics
        ]
    if params:
        body["params"] = [{"key": p.key, "value": p.value} for p in params]
    if tags:
        body["tags"] = [{"key": t.key, "value": t.value} for t in tags]
    return body


def post_log_batch(
    store: Any,
    run_id: str,
    metrics: Sequence[MetricPoint],
    params: Sequence[Entry],
    tags: Sequence[Entry],
) -> None:
    """One ``LogBatch`` call; raises what ``MlflowClient.log_batch`` would raise."""
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    body = log_batch_body(run_id, metrics, params, tags)
    response = http_request(  # type: ignore[no-untyped-call]
        store.get_host_creds(), LOG_BATCH_ENDPOINT, "POST", json=body
    )
    verify_rest_response(response, LOG_BATCH_ENDPOINT)
