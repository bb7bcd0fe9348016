"""Entry points MLflow loads for the ``syncd:`` tracking URI scheme.

MLflow imports this module on every ``import mlflow`` in an environment where
syncd is installed (entry-point group ``mlflow.tracking_store``), so it stays
tiny: the standard library only, and the store (which imports MLflow's
internals) is imported inside the builder, when a ``syncd:`` URI is used.
The same holds for the model registry builder (``mlflow.model_registry_store``),
which MLflow uses for a ``syncd:`` URI when no ``MLFLOW_REGISTRY_URI`` is set.

``syncd:s3://bucket/prefix`` writes into a local spool folder that a background
thread uploads to the prefix (see :mod:`syncd.uri_upload`).

With ``SYNCD_RANK_ZERO_ONLY=1`` only global rank 0 of a distributed job (the
rank ``RunRecorder(enabled=None)`` reads) writes under the root; every other
rank gets a store over a private temporary folder, removed at exit, so each
MLflow call behaves as usual and nothing reaches the root.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEME = "syncd"
RANK_ZERO_ONLY_ENV = "SYNCD_RANK_ZERO_ONLY"

_log = logging.getLogger("syncd.mlflow")
_stores: dict[Path, Any] = {}
_discarding: dict[str, Any] = {}  # root or s3 prefix -> a non-zero rank's store for it
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
            f"{store_uri!r}: the syncd: tracking URI takes a local root"
            " (syncd:///absolute/path or syncd:relative/path) or syncd:s3://bucket/prefix"
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


def s3_of(store_uri: str) -> tuple[str, str] | None:
    """``(bucket, prefix)`` for ``syncd:s3://bucket/prefix``; None for any other URI."""
    rest = store_uri[len(SCHEME) + 1 :] if store_uri.startswith(SCHEME + ":") else ""
    if not rest.lower().startswith("s3://"):
        return None
    parts = urlsplit(rest)
    if parts.query or parts.fragment:
        raise ValueError(f"a syncd: URI takes no query or fragment: {store_uri!r}")
    if not parts.netloc:
        raise ValueError(f"{store_uri!r} names no bucket: write syncd:s3://bucket/prefix")
    prefix = "/".join(p for p in unquote(parts.path).split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"{store_uri!r}: the prefix may not contain . or .. segments")
    return parts.netloc, prefix


def rank_zero_only(env: dict[str, str] | None = None) -> bool:
    """True when ``SYNCD_RANK_ZERO_ONLY`` asks that only global rank 0 write."""
    value = (os.environ if env is None else env).get(RANK_ZERO_ONLY_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{RANK_ZERO_ONLY_ENV}={value!r}: write 1 (or true) to enable, 0 to disable")


def _discarding_store(store_uri: str, key: str) -> Any:
    """This process's store for ``key`` over a private temporary folder (a non-zero rank's)."""
    with _stores_lock:
        store = _discarding.get(key)
        if store is None:
            from syncd.uri_store import SyncdStore

            scratch = Path(tempfile.mkdtemp(prefix="syncd-rank-discard-"))
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            factory: Any = SyncdStore
            store = factory(scratch)
            _discarding[key] = store
            _log.info(
                "syncd: %s=1 and global rank is not 0: %s records nothing (calls are"
                " answered from %s, removed at exit)",
                RANK_ZERO_ONLY_ENV,
                store_uri,
                scratch,
            )
        return store


def build_store(store_uri: str, artifact_uri: str | None = None) -> Any:
    """Builder MLflow calls for a ``syncd:`` tracking URI: one store per root folder."""
    try:
        s3 = s3_of(store_uri)
        root = None if s3 else root_of(store_uri)
        if rank_zero_only():
            from syncd.record.recorder import global_rank

            if global_rank() != 0:
                return _discarding_store(store_uri, f"s3://{s3[0]}/{s3[1]}" if s3 else str(root))
    except ValueError as exc:
        from mlflow.exceptions import MlflowException

        raise MlflowException(str(exc)) from None
    if s3 is not None:
        from syncd.uri_upload import spool_dir

        root = spool_dir(*s3)
    assert root is not None
    with _stores_lock:
        store = _stores.get(root)
        if store is None:
            from syncd.uri_store import SyncdStore

            factory: Any = SyncdStore  # MLflow's unenforced abstract methods are refused there
            store = factory(root, s3=s3)
            _stores[root] = store
            _log.info("syncd: tracking URI %s writes run records under %s", store_uri, root)
        return store


def build_registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """Builder MLflow calls for a ``syncd:`` registry URI (the tracking URI by default)."""
    from syncd.uri_registry import SyncdRegistryStore

    factory: Any = SyncdRegistryStore  # unserved registry calls are refused there
    return factory(build_store(store_uri))
