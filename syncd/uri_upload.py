"""Uploads a ``syncd:s3://bucket/prefix`` spool to S3, off the training loop.

The store writes every record into a local spool folder exactly as for a local
root; a :class:`SpoolUploader` thread copies what changed to the same relative
keys under the prefix:

- a run's files (everything under its ``artifacts/`` and ``models/`` folders)
  before its ``run_record.jsonl``, so a reader never meets a line naming an
  object that is not there yet;
- the record object up to its last complete line only, re-uploaded whole as it
  grows: each upload is a prefix-extension of the one before it (the daemon's
  S3 source reads only the new bytes);
- ``experiments.json``, merged into the object already under the prefix (the
  ids of an S3 root are derived from the experiment name, so hosts sharing a
  prefix agree on every id without coordination). The merged document is put
  conditionally (``If-Match`` on the ETag read, ``If-None-Match: *`` when there
  was none): a host that wrote in between makes the put fail with 412, and the
  merge is redone from what it wrote, so no host's experiment is lost. Stores
  without conditional writes (501) get the unconditional put and a read-back.

Passes run at most every ``interval`` seconds, and at once when a run ends or
the interpreter exits (the caller waits a bounded time). A pass holds the
spool's upload lock (``flock`` on ``.upload.lock``): processes sharing a spool
upload one after the other, each reading the files only once holding it, so an
object never shrinks. What was uploaded is kept in ``.upload-state.json``; a
later process on the same spool sends whatever an earlier one could not.
Failures are logged and retried with backoff; they never reach the caller.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from syncd.record.events import RECORD_FILENAME

EXPERIMENTS_FILE = "experiments.json"
STATE_FILE = ".upload-state.json"
LOCK_FILE = ".upload.lock"
RUN_FOLDERS = ("artifacts", "models")
DEFAULT_INTERVAL = 5.0
DEFAULT_FLUSH_TIMEOUT = 10.0
MAX_BACKOFF = 60.0
MERGE_ATTEMPTS = 20  # conditional puts of experiments.json lost to other hosts in one pass
_LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_UNSUPPORTED = frozenset({"NotImplemented", "501"})


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return None if code is None else str(code)
    return None


_log = logging.getLogger("syncd.upload")


def spool_dir(bucket: str, prefix: str, env: dict[str, str] | None = None) -> Path:
    """``$SYNCD_SPOOL_DIR/<bucket>/<prefix>``, else ``<temp dir>/syncd-spool/<bucket>/<prefix>``."""
    import tempfile

    environ = os.environ if env is None else env
    base = environ.get("SYNCD_SPOOL_DIR") or os.path.join(tempfile.gettempdir(), "syncd-spool")
    parts = [p for p in prefix.split("/") if p and p not in (".", "..")]
    return Path(os.path.abspath(base)).joinpath(bucket, *parts)


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (``default`` when unset or bad)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw)
    except ValueError:
        return default
    return value if value > 0 else default


def make_client(connect_timeout: float = 5.0) -> Any:
    """A boto3 S3 client (standard credential chain, ``AWS_ENDPOINT_URL``) that fails fast.

    Retries are the uploader's own (the next pass, with backoff), so one pass
    never waits long on an S3 that is down.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=30.0,
        retries={"mode": "standard", "max_attempts": 1},
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def complete_lines(path: Path) -> bytes:
    """The file's bytes up to its last newline (a line being written is left for later)."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def merge_experiments(remote: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """``remote`` with every experiment of ``local`` added; local tags win for its own."""
    merged = {"next_id": 1, **remote}
    experiments = dict(remote.get("experiments", {}))
    for exp_id, exp in local.get("experiments", {}).items():
        known = experiments.get(exp_id)
        if known is None:
            experiments[exp_id] = exp
        else:
            tags = {**known.get("tags", {}), **exp.get("tags", {})}
            experiments[exp_id] = {**known, "tags": tags}
    merged["experiments"] = experiments
    return merged


class SpoolUploader:
    """Copies a spool folder to ``s3://bucket/prefix`` in a background thread."""

    def __init__(
        self,
        spool: Path,
        bucket: str,
        prefix: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        client: Any = None,
    ) -> None:
        self.spool = spool
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.interval = interval
        self._client = client
        self._conditional = True  # False once the store answered 501 to a conditional put
        self._wake = threading.Condition()
        self._requested = 0  # passes asked for (flush); a pass serves every earlier request
        self._served = 0
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.last_error: str | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child has no upload thread: it starts its own when it needs one."""
        self._thread = None
        self._wake = threading.Condition()
        self._requested = self._served = 0

    # -- the thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"syncd-upload-{self.bucket}", daemon=True
            )
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Ask for a pass now and wait for it at most ``timeout`` s; True when it succeeded."""
        self.start()
        with self._wake:
            self._requested += 1
            wanted = self._requested
            self._wake.notify_all()
            ok = self._wake.wait_for(lambda: self._served >= wanted, timeout)
        return ok and self._failures == 0

    def _loop(self) -> None:
        while True:
            with self._wake:
                delay = self.interval
                if self._failures:
                    delay = min(MAX_BACKOFF, self.interval * 2 ** min(self._failures, 10))
                self._wake.wait_for(lambda: self._requested > self._served, delay)
                wanted = self._requested
            self.run_pass()
            with self._wake:
                self._served = max(self._served, wanted)
                self._wake.notify_all()

    def run_pass(self) -> bool:
        """One upload pass; failures are logged and counted, never raised."""
        try:
            self.upload_pass()
        except Exception as exc:  # any S3 or file error: keep the spool, retry later
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._failures == 1 or self._failures % 10 == 0:
                _log.warning(
                    "syncd: uploading %s to s3://%s/%s failed (%d in a row, retrying): %s",
                    self.spool,
                    self.bucket,
                    self.prefix,
                    self._failures,
                    self.last_error,
                )
            return False
        if self._failures:
            _log.warning("syncd: uploads to s3://%s/%s resumed", self.bucket, self.prefix)
        self._failures, self.last_error = 0, None
        return True

    # -- one pass ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.spool.mkdir(parents=True, exist_ok=True)
        with open(self.spool / LOCK_FILE, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                state_path = self.spool / STATE_FILE
                try:
                    state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8"))
                except (FileNotFoundError, ValueError):
                    state = {}
                state.setdefault("files", {})
                try:
                    yield state
                finally:
                    tmp = state_path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
                    os.replace(tmp, state_path)
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def upload_pass(self) -> int:
        """Upload everything changed since the last pass; the number of objects put."""
        if not self.spool.is_dir():
            return 0
        put = 0
        with self._locked() as state:
            files: dict[str, Any] = state["files"]
            for record in sorted(self.spool.glob(f"*/*/{RECORD_FILENAME}")):
                # the record is read first: every file its lines name exists by then
                # (a line naming a file is written after the file) and goes up first
                uploaded = files.get(self._rel(record))
                if uploaded is not None and record.stat().st_size == uploaded:
                    continue  # unchanged since its last upload: its files went up before it
                data = complete_lines(record)
                run_dir = record.parent
                for folder in RUN_FOLDERS:
                    for path in sorted((run_dir / folder).rglob("*")):
                        if path.is_file():
                            put += self._file(files, path)
                put += self._record(files, record, data)
            put += self._experiments(files)
        return put

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.spool).as_posix()

    def _file(self, files: dict[str, Any], path: Path) -> int:
        rel = self._rel(path)
        st = path.stat()
        mark = [st.st_size, st.st_mtime_ns]
        if files.get(rel) == mark:
            return 0
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=path.read_bytes())
        files[rel] = mark
        return 1

    def _record(self, files: dict[str, Any], path: Path, data: bytes) -> int:
        rel = self._rel(path)
        if not data or files.get(rel) == len(data):
            return 0
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)
        files[rel] = len(data)
        return 1

    def _experiments(self, files: dict[str, Any]) -> int:
        path = self.spool / EXPERIMENTS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0
        digest = hashlib.sha256(raw).hexdigest()
        if files.get(EXPERIMENTS_FILE) == digest:
            return 0
        local = json.loads(raw)
        key = self.key(EXPERIMENTS_FILE)
        for attempt in range(MERGE_ATTEMPTS):
            remote, etag = self._get_json(key)
            merged = merge_experiments(remote, local)
            if merged == remote and etag is not None:
                files[EXPERIMENTS_FILE] = digest
                return 0
            body = json.dumps(merged, indent=1, sort_keys=True).encode()
            # Only over the version read: a host that wrote in between makes this put
            # fail (412), and the merge starts again from what that host wrote.
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            if self._conditional:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
                except Exception as exc:
                    code = _error_code(exc)
                    if code in _LOST_RACE:
                        time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))  # retry backoff
                        continue
                    if code not in _UNSUPPORTED:
                        raise
                    _log.warning(
                        "syncd: s3://%s does not support conditional writes (%s); hosts"
                        " sharing the prefix may overwrite each other's experiments.json",
                        self.bucket,
                        code,
                    )
                    self._conditional = False
                else:
                    files[EXPERIMENTS_FILE] = digest
                    return 1
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
            after, _etag = self._get_json(key)
            if all(i in after.get("experiments", {}) for i in local.get("experiments", {})):
                files[EXPERIMENTS_FILE] = digest
                return 1
        return 1  # not confirmed: the next pass merges again

    def _get_json(self, key: str) -> tuple[dict[str, Any], str | None]:
        """The object's JSON document ({} when absent or not a document) and its ETag."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return {}, None
            raise
        etag = answer.get("ETag")
        try:
            data = json.loads(answer["Body"].read())
        except ValueError:
            return {}, etag
        return (data if isinstance(data, dict) else {}), etag
