"""The LogBatch body syncd builds for a tracking server, as protobuf's JSON mapping spells it."""

from __future__ import annotations

import json
import math

from syncd.projection import Entry, MetricPoint
from syncd.sink.rest_batch import log_batch_body


def test_the_body_is_strict_json_with_non_finite_values_spelled_out() -> None:
    body = log_batch_body(
        "r1",
        [
            MetricPoint("a", v, 1700000000000 + i, i)
            for i, v in enumerate([1.5, math.nan, -math.inf, math.inf])
        ],
        [Entry("lr", "0.1")],
        [],
    )
    text = json.dumps(body, allow_nan=False)  # what requests sends: no bare NaN allowed
    assert json.loads(text) == {
        "run_id": "r1",
        "metrics": [
            {"key": "a", "value": 1.5, "timestamp": 1700000000000, "step": 0},
            {"key": "a", "value": "NaN", "timestamp": 1700000000001, "step": 1},
            {"key": "a", "value": "-Infinity", "timestamp": 1700000000002, "step": 2},
            {"key": "a", "value": "Infinity", "timestamp": 1700000000003, "step": 3},
        ],
        "params": [{"key": "lr", "value": "0.1"}],
    }


def test_the_protobuf_parser_reads_the_body_as_mlflow_s_own_message() -> None:
    from google.protobuf.json_format import ParseDict
    from mlflow.protos.service_pb2 import LogBatch

    body = log_batch_body("r1", [MetricPoint("a", math.nan, 5, 2)], [], [Entry("t", "v")])
    message = ParseDict(json.loads(json.dumps(body)), LogBatch())
    assert message.run_id == "r1" and message.tags[0].key == "t"
    assert math.isnan(message.metrics[0].value) and message.metrics[0].step == 2
