"""Records in S3 (or an S3-compatible store): discovery by listing, ranged reads.

A writer on S3 re-uploads the whole object as it grows; the earlier bytes stay
a prefix. So a record is read exactly like a local file, through
``read_at(offset, length)``, here a ranged GET pinned to the ETag seen by
``stat()``: the bytes of one sync all come from one version of the object.

Discovery is a paginated ListObjectsV2 under the root's prefix, with the
root's glob applied to the keys. Each listed object carries its size, ETag and
LastModified, so the engine can tell an unchanged object from the listing
alone, without a GET. The ledger keeps (size, mtime_ns, etag) per record; for
an object ``mtime_ns`` is LastModified in whole seconds (what both a listing and
a HEAD report) and ``etag`` its ETag: a re-upload within the same second with
the same size still looks changed.

Artifacts are keys under the record's prefix ("folders" are key prefixes),
confined as on disk (``..`` and absolute paths are refused), downloaded into a
private staging folder one object at a time and digested from the bytes (an
ETag that is a plain MD5 of the bytes stands for them).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from syncd.artifacts import (
    STAGE_PREFIX,
    ArtifactRefused,
    ResolvedArtifact,
    artifact_key,
    check_artifact_path,
)
from syncd.config import Root
from syncd.errors import SourceError
from syncd.record.events import RECORD_FILENAME

DEFAULT_PATTERN = f"**/{RECORD_FILENAME}"
MAX_ATTEMPTS = 5  # botocore's standard retry mode: throttling (503 SlowDown) and 5xx
_CHUNK = 1024 * 1024
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
STAGE_HEADROOM = 64 * 1024 * 1024  # bytes left free on the staging disk


class S3SourceError(OSError, SourceError):
    """S3 could not be asked (missing bucket, access denied, endpoint down); says why.

    ``code`` is S3's error code (``ExpiredToken``, ``AccessDenied``...) or the HTTP
    status, "" when S3 did not answer.
    """

    code: str = ""


# S3 error codes that mean the credentials themselves are at fault: expired, unknown
# or mis-signed. The client is made anew before the next try, so the credential chain
# is read again (a rewritten credentials file is picked up without a reload).
CREDENTIAL_CODES = frozenset(
    {"ExpiredToken", "InvalidToken", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)


def source_error(exc: BaseException, what: str) -> S3SourceError:
    """An S3SourceError for ``exc``, with a one-line reason naming ``what``."""
    error = S3SourceError(errno.EIO, describe_error(exc, what))
    error.code = _code(exc)
    return error


class ObjectChanged(OSError):
    """The object was replaced between stat() and a read; read again on the next sync."""


@dataclass(frozen=True, slots=True)
class S3Object:
    """One listed (or HEAD-ed) object: what tells an unchanged object without a GET."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified_ns: int  # LastModified, whole seconds, in ns

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def mtime_ns(self) -> int:
        """LastModified (whole seconds, in ns); the ETag is kept beside it."""
        return self.last_modified_ns


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no trailing slash)."""
    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


# -- clients -----------------------------------------------------------------------------

_clients: dict[tuple[str | None, str | None, float], Any] = {}
_clients_lock = threading.Lock()


def client_for(root: Root, timeout: float = 30.0) -> Any:
    """A boto3 S3 client for ``root`` (shared; boto3 clients are thread-safe).

    The standard credential chain (environment, profile, instance role) applies;
    the endpoint is the root's ``endpoint_url``, else ``AWS_ENDPOINT_URL``, else AWS.
    """
    endpoint = root.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    key = (endpoint, root.region, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                region_name=root.region,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
        return client


def forget_client(root: Root, timeout: float = 30.0) -> None:
    """Drop the cached client of ``root``: the next one reads the credential chain again."""
    endpoint = root.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    with _clients_lock:
        _clients.pop((endpoint, root.region, timeout), None)


def forget_clients() -> None:
    """Drop cached clients (tests change credentials and endpoints)."""
    with _clients_lock:
        _clients.clear()


def describe_error(exc: BaseException, what: str) -> str:
    """A one-line reason for an S3 failure, naming ``what`` was asked."""
    from botocore.exceptions import (
        ClientError,
        CredentialRetrievalError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        TokenRetrievalError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        hint = {
            "NoSuchBucket": "the bucket does not exist (check the root's bucket name, region"
            " and endpoint)",
            "AccessDenied": "access denied (check s3:ListBucket and s3:GetObject)",
            "403": "access denied (check the credentials and s3:ListBucket, s3:GetObject)",
            "400": "bad request; S3 names no reason in answer to a HEAD request, and expired"
            " or invalid credentials are the usual cause",
            "InvalidAccessKeyId": "the access key is not valid (check the credentials)",
            "SignatureDoesNotMatch": "the secret key does not match the access key",
            "ExpiredToken": "the credentials have expired (renew them; they are read again"
            " on the next try)",
            "InvalidToken": "the session token is not valid (renew the credentials)",
        }.get(code, err.get("Message") or code)
        return f"{what}: {hint} ({code})"
    if isinstance(exc, NoCredentialsError):
        return f"{what}: no AWS credentials found (environment, profile or instance role)"
    if isinstance(exc, CredentialRetrievalError | TokenRetrievalError | PartialCredentialsError):
        return f"{what}: the credentials could not be obtained or renewed ({exc})"
    if isinstance(exc, EndpointConnectionError | ReadTimeoutError):
        return f"{what}: endpoint unreachable ({exc})"
    return f"{what}: {type(exc).__name__}: {exc}"


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


def _not_found(exc: BaseException) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


def _seconds_ns(value: datetime) -> int:
    return int(value.timestamp()) * 1_000_000_000


# -- discovery ---------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A key glob as a regex: ``**/`` any folders (or none), ``*`` and ``?`` within one."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(fnmatch.translate(pattern[i : end + 1])[4:-3])
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def list_records(client: Any, root_uri: str, pattern: str = DEFAULT_PATTERN) -> Iterator[S3Object]:
    """Record objects under ``root_uri``, in key order, by paginated ListObjectsV2.

    One LIST request per 1,000 keys; no object is read. S3SourceError when the
    bucket cannot be listed (says why).
    """
    bucket, prefix = split_uri(root_uri)
    regex = glob_regex(pattern)
    base = f"{prefix}/" if prefix else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        for page in pages:
            for item in page.get("Contents", ()):
                key = str(item["Key"])
                if key.endswith("/") or not regex.fullmatch(key[len(base) :]):
                    continue
                yield S3Object(
                    bucket=bucket,
                    key=key,
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified_ns=_seconds_ns(item["LastModified"]),
                )
    except S3SourceError:
        raise
    except Exception as exc:
        raise source_error(exc, f"listing {root_uri}") from exc


def head(client: Any, bucket: str, key: str) -> S3Object:
    """The object's size, ETag and LastModified; FileNotFoundError when it is gone."""
    uri = f"s3://{bucket}/{key}"
    try:
        meta = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(errno.ENOENT, "no such object", uri) from None
        raise source_error(exc, uri) from exc
    return S3Object(
        bucket=bucket,
        key=key,
        size=int(meta["ContentLength"]),
        etag=str(meta.get("ETag", "")).strip('"'),
        last_modified_ns=_seconds_ns(meta["LastModified"]),
    )


# -- one record --------------------------------------------------------------------------


class S3Record:
    """A record object. ``listed`` (from a listing) answers the first ``stat()`` without
    a request; reads are ranged GETs pinned to the ETag of the last ``stat()``."""

    __slots__ = ("_client", "_current", "_listed", "bucket", "key")

    def __init__(self, client: Any, bucket: str, key: str, listed: S3Object | None = None):
        self._client = client
        self.bucket = bucket
        self.key = key
        self._listed = listed
        self._current: S3Object | None = None

    @classmethod
    def from_uri(cls, client: Any, uri: str, listed: S3Object | None = None) -> S3Record:
        bucket, key = split_uri(uri)
        return cls(client, bucket, key, listed)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def display(self) -> str:
        return self.uri

    @property
    def prefix(self) -> str:
        """The run directory's key prefix (without the trailing slash)."""
        return posix_dirname(self.key)

    def stat(self) -> tuple[int, int]:
        """Size and change mark (see the module doc); from the listing when there is one."""
        if self._listed is not None:
            obj, self._listed = self._listed, None
        else:
            obj = head(self._client, self.bucket, self.key)
        self._current = obj
        return obj.size, obj.mtime_ns

    @property
    def etag(self) -> str | None:
        """The ETag of the last ``stat()``, else of the listing (None: neither yet)."""
        obj = self._current or self._listed
        return obj.etag if obj is not None else None

    def listed_stat(self) -> tuple[int, int] | None:
        """What the listing said (no request), until the first ``stat()``."""
        return (self._listed.size, self._listed.mtime_ns) if self._listed else None

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if self._current is None:
            self.stat()
        assert self._current is not None
        extra = {"IfMatch": f'"{self._current.etag}"'} if self._current.etag else {}
        try:
            reply = self._client.get_object(
                Bucket=self.bucket,
                Key=self.key,
                Range=f"bytes={offset}-{offset + length - 1}",
                **extra,
            )
            body = reply["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except Exception as exc:
            code = _code(exc)
            if _not_found(exc):
                raise FileNotFoundError(errno.ENOENT, "no such object", self.uri) from None
            if code in ("InvalidRange", "416"):
                return b""  # past the end: as pread does
            if code in ("PreconditionFailed", "412"):
                raise ObjectChanged(
                    errno.EAGAIN, "the object was replaced while being read", self.uri
                ) from None
            raise source_error(exc, self.uri) from exc

    def close(self) -> None:
        self._current = None

    def resolve_artifact(self, path: str, artifact_path: str | None) -> ResolvedArtifact:
        return resolve_artifact(self._client, self.bucket, self.prefix, path, artifact_path)

    def artifact_sizes(self, path: str, artifact_path: str | None) -> dict[str, int]:
        """What an ``artifact`` event of this record puts in MLflow (``syncd verify``)."""
        return artifact_sizes(self._client, self.bucket, self.prefix, path, artifact_path)


def posix_dirname(key: str) -> str:
    return key.rpartition("/")[0]


# -- artifacts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listed:
    rel: str  # path inside the folder ("" for a single file)
    obj: S3Object


def _digest_of(client: Any, obj: S3Object) -> str:
    """An object's content digest: its ETag when that is a plain MD5, else the bytes' sha256."""
    if _PLAIN_MD5.fullmatch(obj.etag):
        return f"md5:{obj.etag}"
    return _download_digest(client, obj)


def _listing_digest(files: list[tuple[str, str]]) -> str:
    listing = hashlib.sha256()
    for rel, digest in files:
        listing.update(f"{rel}\0{digest}\n".encode())
    return listing.hexdigest()


def confine_key(prefix: str, relative: str) -> str:
    """The key of ``relative`` under the run prefix, or ArtifactRefused when it would leave it."""
    if "://" in relative:
        raise ArtifactRefused(f"artifact path {relative!r} is a URI; it must be relative")
    if "\\" in relative:
        raise ArtifactRefused(f"artifact path {relative!r} holds a backslash")
    pure = PurePosixPath(relative)
    if pure.is_absolute():
        raise ArtifactRefused(f"artifact path {relative!r} is absolute; it must be relative")
    if ".." in pure.parts:
        raise ArtifactRefused(f"artifact path {relative!r} leaves the run directory ('..')")
    rel = pure.as_posix()
    if rel == ".":
        return prefix
    return f"{prefix}/{rel}" if prefix else rel


def _folder_objects(client: Any, bucket: str, folder_key: str, shown: str) -> list[_Listed]:
    """Every object under the key prefix ``folder_key/`` as (path inside, object), sorted."""
    base = f"{folder_key}/" if folder_key else ""
    out: list[_Listed] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        for page in pages:
            for item in page.get("Contents", ()):
                key = str(item["Key"])
                rel = key[len(base) :]
                if not rel or key.endswith("/"):
                    continue  # a "folder marker" object
                parts = rel.split("/")
                if any(part in ("", ".", "..") for part in parts):
                    raise ArtifactRefused(
                        f"artifact folder {shown!r} holds the key {key!r}, which is not a"
                        " plain relative path"
                    )
                obj = S3Object(
                    bucket=bucket,
                    key=key,
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified_ns=_seconds_ns(item["LastModified"]),
                )
                out.append(_Listed(rel, obj))
    except ArtifactRefused:
        raise
    except Exception as exc:
        raise source_error(exc, f"listing artifact folder s3://{bucket}/{base}") from exc
    return sorted(out, key=lambda item: item.rel)


def _locate(client: Any, bucket: str, prefix: str, path: str) -> tuple[str, list[_Listed], bool]:
    """The confined key of ``path``, its objects, and whether it is a folder (a key prefix).

    ArtifactRefused when it leaves the run prefix or nothing is there.
    """
    key = confine_key(prefix, path.rstrip("/") if path not in ("/", "") else path)
    if not path.endswith("/") and key != prefix:
        try:
            return key, [_Listed("", head(client, bucket, key))], False
        except FileNotFoundError:
            pass
    files = _folder_objects(client, bucket, key, path)
    if not files:
        raise ArtifactRefused(f"artifact path {path!r} does not exist")
    return key, files, True


def artifact_sizes(
    client: Any, bucket: str, prefix: str, path: str, artifact_path: str | None
) -> dict[str, int]:
    """The MLflow artifact files (and sizes) an ``artifact`` event uploads; {} when syncd
    refuses it. Placed as a sync places them: a file as ``<artifact_path>/<name>``, a
    folder's objects under ``<artifact_path>``. S3SourceError when S3 cannot be asked."""
    try:
        check_artifact_path(artifact_path)
        key, files, is_dir = _locate(client, bucket, prefix, path)
    except ArtifactRefused:
        return {}  # reported by the sync as a line error; nothing is expected in MLflow
    base = posixpath.normpath(artifact_path) if artifact_path else ""
    base = "" if base == "." else base
    if not is_dir:
        return {posixpath.join(base, PurePosixPath(key).name): files[0].obj.size}
    return {posixpath.join(base, item.rel): item.obj.size for item in files}


def resolve_artifact(
    client: Any, bucket: str, prefix: str, path: str, artifact_path: str | None
) -> ResolvedArtifact:
    """A confined artifact under the run prefix: one object, or a key prefix (a folder).

    Nothing is downloaded here unless an object's ETag is not a plain MD5 (multipart
    uploads): its digest then comes from the bytes.
    """
    check_artifact_path(artifact_path)
    key, files, is_dir = _locate(client, bucket, prefix, path)
    shown = path
    if not is_dir:
        digest = _digest_of(client, files[0].obj)
    else:
        digest = _listing_digest([(item.rel, _digest_of(client, item.obj)) for item in files])
    name = PurePosixPath(key).name or "artifacts"
    stager = _Stager(client, bucket, key, name, is_dir, tuple(files), shown)
    return ResolvedArtifact(
        key=artifact_key(path, artifact_path),
        local_path=Path(name),
        artifact_path=artifact_path,
        is_dir=is_dir,
        digest=digest,
        relative=path,
        size=sum(item.obj.size for item in files),
        stage=stager.stage,
    )


def _download_digest(client: Any, obj: S3Object) -> str:
    """sha256 of an object's bytes, streamed (a multipart ETag is no content digest)."""
    digest = hashlib.sha256()
    for chunk in _stream(client, obj):
        digest.update(chunk)
    return digest.hexdigest()


def _stream(client: Any, obj: S3Object) -> Iterator[bytes]:
    try:
        reply = client.get_object(Bucket=obj.bucket, Key=obj.key)
    except Exception as exc:
        if _not_found(exc):
            raise ArtifactRefused(f"artifact object {obj.uri} disappeared") from None
        raise source_error(exc, obj.uri) from exc
    body = reply["Body"]
    try:
        while chunk := body.read(_CHUNK):
            yield bytes(chunk)
    finally:
        body.close()


@dataclass(frozen=True, slots=True)
class _Stager:
    client: Any
    bucket: str
    key: str
    name: str
    is_dir: bool
    files: tuple[_Listed, ...]
    shown: str

    @contextmanager
    def stage(self, area: Path | None = None) -> Iterator[tuple[Path, str]]:
        """Download the artifact into a private staging folder, one object at a time.

        Yields (path to upload, digest of exactly the staged bytes); the folder is
        removed afterwards, also on errors (and by ``clean_stale_stages`` after a kill).
        """
        total = sum(item.obj.size for item in self.files)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=area))
        try:
            free = shutil.disk_usage(stage).free
            if total + STAGE_HEADROOM > free:
                raise OSError(
                    errno.ENOSPC,
                    f"staging {self.shown!r} needs {total} bytes; {free} free in {stage.parent}",
                )
            dest_root = stage / self.name
            if not self.is_dir:
                yield dest_root, self._fetch(self.files[0].obj, dest_root)
                return
            dest_root.mkdir()
            listing: list[tuple[str, str]] = []
            for item in self.files:
                dest = dest_root / item.rel
                if not dest.resolve().is_relative_to(dest_root.resolve()):
                    raise ArtifactRefused(f"artifact folder {self.shown!r} holds {item.rel!r}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                listing.append((item.rel, self._fetch(item.obj, dest)))
            yield dest_root, _listing_digest(listing)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _fetch(self, obj: S3Object, dest: Path) -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        sha = hashlib.sha256()
        with dest.open("xb") as out:
            for chunk in _stream(self.client, obj):
                md5.update(chunk)
                sha.update(chunk)
                out.write(chunk)
        # The GET may have met a newer version than the listing: digest what was staged.
        return f"md5:{md5.hexdigest()}" if _PLAIN_MD5.fullmatch(obj.etag) else sha.hexdigest()
