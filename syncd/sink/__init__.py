"""The MLflow sink (see :mod:`syncd.sink.mlflow_sink`)."""

from syncd.sink.calls import Bounded, Calls, RetryPolicy, classify, unbounded
from syncd.sink.mlflow_sink import MlflowSink
from syncd.sink.results import ApplyResult
from syncd.sink.store import default_artifact_root, is_sqlite_uri, sqlite_path

__all__ = [
    "ApplyResult",
    "Bounded",
    "Calls",
    "MlflowSink",
    "RetryPolicy",
    "classify",
    "default_artifact_root",
    "is_sqlite_uri",
    "sqlite_path",
    "unbounded",
]
