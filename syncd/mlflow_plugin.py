"""Entry points MLflow loads for the ``syncd:`` tracking URI scheme.

MLflow imports this module on every ``import mlflow`` in an environment where
syncd is installed (entry-point group ``mlflow.tracking_store``), so it stays
tiny: the standard library only, and the store (which imports MLflow's
internals) is imported inside the builder, when a ``syncd:`` URI is used.
The same holds for the model registry builder (``mlflow.model_registry_store``),
which MLflow uses for a ``syncd:`` URI when no ``MLFLOW_REGISTRY_URI`` is set.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEME = "syncd"

_log = logging.getLogger("syncd.mlflow")
_stores: dict[Path, Any] = {}
_stores_lock = threading.Lock()


def root_of(store_uri: str) -> Path:
    """The absolute root folder a ``syncd:`` URI names.

    ``syncd:///abs/path`` and ``syncd:relative/path`` (resolved against the
    current directory, once) are accepted; anything else is a ValueError.
    """
    parts = urlsplit(store_uri)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a syncd: URI: {store_uri!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a syncd: URI takes no query or fragment: {store_uri!r}")
    rest = store_uri[len(SCHEME) + 1 :]
    if "://" in rest and not rest.startswith("//"):
        raise ValueError(
            f"{store_uri!r}: only local roots are supported by the syncd: tracking URI"
            " (syncd:///absolute/path or syncd:relative/path)"
        )
    if parts.netloc:
        raise ValueError(
            f"{store_uri!r}: a syncd: URI names a local folder; write syncd:///absolute/path"
            " (three slashes) or syncd:relative/path"
        )
    path = unquote(parts.path)
    if not path:
        raise ValueError(f"{store_uri!r} names no folder")
    return Path(os.path.abspath(path))


def build_store(store_uri: str, artifact_uri: str | None = None) -> Any:
    """Builder MLflow calls for a ``syncd:`` tracking URI: one store per root folder."""
    try:
        root = root_of(store_uri)
    except ValueError as exc:
        from mlflow.exceptions import MlflowException

        raise MlflowException(str(exc)) from None
    with _stores_lock:
        store = _stores.get(root)
        if store is None:
            from syncd.uri_store import SyncdStore

            factory: Any = SyncdStore  # MLflow's unenforced abstract methods are refused there
            store = factory(root)
            _stores[root] = store
            _log.info("syncd: tracking URI %s writes run records under %s", store_uri, root)
        return store


def build_registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """Builder MLflow calls for a ``syncd:`` registry URI (the tracking URI by default)."""
    from syncd.uri_registry import SyncdRegistryStore

    factory: Any = SyncdRegistryStore  # unserved registry calls are refused there
    return factory(build_store(store_uri))
