"""The model registry behind a ``syncd:`` tracking URI (when no MLFLOW_REGISTRY_URI is set).

Training code registers models as a side effect of ``log_model(...,
registered_model_name=...)``: MLflow then calls ``create_registered_model`` and
``create_model_version`` here, with the folder it just logged. Those two are
served by recording the registration in the run's ``model`` event; the daemon
registers the version in the mirror's registry (idempotently) when it mirrors
the model. Everything else, including ``mlflow.register_model`` and aliases
called directly, fails with a message that says what to use instead: the
records hold no registry to answer from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.model_registry.abstract_store import AbstractStore

from syncd.uri_store import SyncdStore

_HINT = (
    "the syncd: tracking URI records runs and has no model registry; register models with"
    " mlflow.<flavor>.log_model(..., registered_model_name=...) or"
    " RunRecorder.log_model(..., registered_model_name=..., alias=...), which the syncd"
    " daemon registers when it mirrors the run, or set MLFLOW_REGISTRY_URI to your"
    " model registry"
)
_REGISTERING_FUNCTION = "_register_model"  # mlflow.tracking._model_registry.fluent


def _refuse(name: str) -> Callable[..., Any]:
    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(f"{name} is not supported by the syncd: tracking URI: {_HINT}")

    refused.__name__ = name
    refused.__qualname__ = f"SyncdRegistryStore.{name}"
    refused._syncd_refused = True  # type: ignore[attr-defined]
    return refused


def _called_by_log_model() -> bool:
    """True inside MLflow's ``_register_model`` called by ``log_model``.

    ``log_model`` passes the folder it has just logged (``local_model_path``);
    ``mlflow.register_model`` passes none.
    """
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == _REGISTERING_FUNCTION and "model_registry" in code.co_filename:
            return frame.f_locals.get("local_model_path") is not None
        frame = frame.f_back  # type: ignore[assignment]
    return False


class SyncdRegistryStore(AbstractStore):
    """Registration requests of ``log_model`` become part of the run's model event."""

    def __init__(self, tracking: SyncdStore) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tracking = tracking

    def create_registered_model(
        self,
        name: str,
        tags: list[Any] | None = None,
        description: str | None = None,
        deployment_job_id: str | None = None,
    ) -> RegisteredModel:
        # log_model's registration creates the name first, then the version (recorded
        # below); the name alone records nothing. Anything else is refused here.
        if not _called_by_log_model():
            raise MlflowException(
                f"create_registered_model is not supported by the syncd: tracking URI: {_HINT}"
            )
        if not name:
            raise MlflowException("Registered model name cannot be empty.", INVALID_PARAMETER_VALUE)
        now = int(time.time() * 1000)
        return RegisteredModel(name, creation_timestamp=now, last_updated_timestamp=now)

    def create_model_version(
        self,
        name: str,
        source: str,
        run_id: str | None = None,
        tags: list[Any] | None = None,
        run_link: str | None = None,
        description: str | None = None,
        local_model_path: str | None = None,
        model_id: str | None = None,
    ) -> ModelVersion:
        """Served for ``log_model(..., registered_model_name=...)`` only.

        That path passes the folder it has just logged (``local_model_path``) and the
        id of a model logged through this root; ``mlflow.register_model`` passes no
        folder and is refused. The version number is the mirror's, known once the
        daemon registers it: the version returned here has none.
        """
        if local_model_path is None or model_id is None:
            raise MlflowException(
                f"create_model_version (mlflow.register_model) is not supported by the syncd:"
                f" tracking URI: {_HINT}"
            )
        try:
            self.tracking.register_model_version(model_id, name)
        except MlflowException as exc:
            raise MlflowException(
                f"create_model_version: model {model_id} was not logged through this syncd:"
                f" root ({exc.message}); {_HINT}"
            ) from exc
        now = int(time.time() * 1000)
        return ModelVersion(
            name=name,
            version=None,  # type: ignore[arg-type]
            creation_timestamp=now,
            source=source,
            run_id=run_id,
            model_id=model_id,
        )


def _install_refusals() -> None:
    for name in dir(AbstractStore):
        if name.startswith("_") or name in SyncdRegistryStore.__dict__:
            continue
        if callable(getattr(AbstractStore, name, None)):
            setattr(SyncdRegistryStore, name, _refuse(name))


_install_refusals()
