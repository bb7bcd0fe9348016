"""Typed syncd configuration.

Layers, lowest to highest: built-in defaults < YAML file < ``SYNCD_*`` environment
(nested with ``__``, e.g. ``SYNCD_WATCH__MODE``) < CLI overrides. A ``null`` value
(or ``None`` override) means "not set here": the lower layer or the default applies.
When no layer sets ``tracking_uri``, ``MLFLOW_TRACKING_URI`` is used, else
``sqlite:///mlflow.db``.

Relative paths (``state_dir``, local ``roots[].path``, relative SQLite URIs) from the
config file resolve against the file's folder; all others against the current
directory. Build settings with :func:`load_config`: every problem becomes a
:class:`~syncd.errors.ConfigError` that names the key (dotted path) and its source.
"""

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from syncd.errors import ConfigError

__all__ = [
    "DEFAULT_HEALTH_ADDR",
    "DEFAULT_TRACKING_URI",
    "LogConfig",
    "Root",
    "Settings",
    "TimeoutsConfig",
    "WatchConfig",
    "WriterConfig",
    "load_config",
    "resolve_sqlite_uri",
]

ENV_PREFIX = "SYNCD_"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_HEALTH_ADDR = "127.0.0.1:9464"

_SQLITE_RELATIVE = re.compile(r"(sqlite(?:\+\w+)?):///(?!/)(.*)", re.ASCII)
_HOSTNAME = re.compile(
    r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?", re.ASCII
)
_Loc = tuple[str | int, ...]


def resolve_sqlite_uri(uri: str, base: Path) -> str:
    """Anchor a relative SQLite URI (``sqlite:///rel/x.db``) at ``base``.

    Absolute ones (``sqlite:////abs/x.db``), in-memory ones and non-SQLite URIs are
    returned unchanged. A query string (``?mode=ro``) is kept.
    """
    match = _SQLITE_RELATIVE.fullmatch(uri)
    if match is None:
        return uri
    scheme, rest = match.groups()
    path, sep, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return uri
    return f"{scheme}:///{_anchor(path, base)}{sep}{query}"


def _anchor(path: str | Path, base: Path) -> str:
    """``path`` made absolute (relative to ``base``), ``~`` expanded, normalised."""
    return os.path.normpath(Path(base).absolute() / Path(path).expanduser())


def _refuse_remote_anchor(value: str, key: str) -> None:
    """A store or ledger must not live on S3: SQLite needs a local file (and locks)."""
    text = value.strip().lower()
    sqlite_on_s3 = text.startswith("sqlite") and "s3:" in text.partition("://")[2]
    if text.startswith(("s3://", "s3a://")) or sqlite_on_s3:
        what = "MLflow store" if key == "tracking_uri" else "ledger"
        raise ValueError(
            f"the {what} cannot live on S3; use a local absolute SQLite path"
            " (sqlite:////var/lib/syncd/mlflow.db) or a server URL"
            + (
                " (http://mlflow:5000), and artifact_root: s3://bucket/prefix for artifacts"
                if key == "tracking_uri"
                else " (postgresql://...)"
            )
        )


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "://" not in value


def _parse_hostport(value: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` -> ``(host, port)``; ``""`` or ``"off"`` -> None (disabled)."""
    value = value.strip()
    if value.lower() in ("", "off"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:9464), or 'off'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = _is_ip(host, ipaddress.IPv6Address)
    elif re.fullmatch(r"[\d.]+", host):
        valid_host = _is_ip(host, ipaddress.IPv4Address)
    else:
        valid_host = _HOSTNAME.fullmatch(host) is not None
    if not valid_host:
        hint = " (an IPv6 address goes in brackets: [::1]:9464)" if ":" in host else ""
        raise ValueError(f"invalid host {host!r}{hint}")
    if not re.fullmatch(r"\d{1,5}", port, re.ASCII) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be an integer in 1-65535, not {port!r}")
    return host, int(port)


def _is_ip(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(host)
    except ValueError:
        return False
    return True


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Root(_Section):
    """A folder (local path or ``s3://bucket/prefix``) scanned for run records.

    A plain string is accepted as shorthand for ``{path: ...}``.
    """

    path: str = Field(min_length=1)
    pattern: str = Field(default="**/run_record.jsonl", min_length=1)
    experiment: str | None = None  # default experiment for records that name none
    # s3:// roots only: an S3-compatible endpoint (MinIO, Ceph; default: AWS_ENDPOINT_URL,
    # else AWS) and the bucket's region (default: the standard AWS configuration)
    endpoint_url: str | None = None
    region: str | None = None
    # "records" (v1 run records), "snapshot" (run directories whose files a mapping,
    # ``mapping``, a YAML file, turns into events), "dvclive" (DVCLive output folders) or
    # "tensorboard" (folders of TensorBoard event files); see docs/formats.md
    format: Annotated[
        Literal["records", "snapshot", "dvclive", "tensorboard"], BeforeValidator(_lower)
    ] = "records"
    mapping: str | None = None
    # dvclive and tensorboard roots: seconds without a change to a run's folder after
    # which its MLflow run is FINISHED (ended at its last data point); data arriving
    # later re-opens it (RUNNING). null: runs stay RUNNING
    finish_after_idle: float | None = Field(default=600.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"path": str(data)} if isinstance(data, str | Path) else data

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        value = value.strip()
        if "://" not in value:
            return _anchor(value, Path.cwd())
        scheme, _, rest = value.partition("://")
        if scheme.lower() != "s3" or not rest.split("/", 1)[0]:
            raise ValueError("expected a local path or s3://bucket/prefix")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if value and not re.match(r"https?://[^/]+", value, re.ASCII):
            raise ValueError("expected an http:// or https:// URL (e.g. http://minio:9000)")
        return value or None

    @model_validator(mode="after")
    def _s3_only_options(self) -> "Root":
        if not self.is_s3 and (self.endpoint_url or self.region):
            raise ValueError("endpoint_url and region apply to s3:// roots only")
        if self.format == "snapshot" and not self.mapping:
            raise ValueError("format snapshot needs a mapping file (mapping: path/to/mapping.yaml)")
        if self.format != "snapshot" and self.mapping:
            raise ValueError("mapping applies to roots with format snapshot only")
        return self

    @field_validator("mapping")
    @classmethod
    def _check_mapping(cls, value: str | None) -> str | None:
        return _anchor(value.strip(), Path.cwd()) if value and value.strip() else None

    @property
    def record_pattern(self) -> str:
        """The glob that finds this root's records: for a snapshot root whose pattern is
        the default, every folder holding the mapping's primary file."""
        if self.format == "snapshot" and self.pattern == "**/run_record.jsonl":
            from syncd.snapshot.mapping import cached_mapping

            assert self.mapping is not None
            return f"**/{cached_mapping(Path(self.mapping)).primary}"
        if self.format == "dvclive" and self.pattern == "**/run_record.jsonl":
            return "**/metrics.json"
        if self.format == "tensorboard" and self.pattern == "**/run_record.jsonl":
            return "**/events.out.tfevents.*"
        return self.pattern

    @property
    def derived(self) -> bool:
        """Its records are derived by syncd from other files (snapshot, dvclive)."""
        return self.format != "records"

    @property
    def is_s3(self) -> bool:
        return self.path.lower().startswith("s3://")


class WatchConfig(_Section):
    mode: Annotated[Literal["auto", "inotify", "polling"], BeforeValidator(_lower)] = "auto"
    rescan_interval: float = Field(default=60.0, gt=0)  # seconds between full rescans
    poll_interval: float = Field(default=2.0, gt=0)  # seconds between polls (polling mode)
    s3_poll_interval: float = Field(default=10.0, gt=0)  # seconds between listings of s3:// roots


class WriterConfig(_Section):
    linger_ms: int = Field(default=150, ge=0, le=5000)  # wait to batch events
    max_backlog_events: int = Field(default=100_000, gt=0)
    drain_timeout: float = Field(default=10.0, gt=0)  # seconds to flush on shutdown
    # records written at once to an MLflow server or database store (SQLite: always 1)
    concurrency: int = Field(default=4, ge=1, le=64)
    # seconds a record's lease lasts unless renewed (at every step, and every ttl/3
    # while a record is held, so one long call never outlives it); a dead
    # writer's records are taken over after this
    lease_ttl: float = Field(default=120.0, ge=1.0)


class LedgerConfig(_Section):
    # days of per-step sync events kept for `syncd status` and audits; 0 keeps them forever
    events_retention_days: float = Field(default=30.0, ge=0)


class TimeoutsConfig(_Section):
    http: float = Field(default=30.0, gt=0)  # seconds


class LogConfig(_Section):
    format: Annotated[Literal["auto", "console", "json"], BeforeValidator(_lower)] = "auto"
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"


class Settings(_Section):
    """The whole syncd configuration.

    Build it with :func:`load_config`, which layers file, environment and flags;
    ``Settings(**values)`` validates exactly ``values`` on top of the defaults.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    tracking_uri: str = DEFAULT_TRACKING_URI
    state_dir: Path = Path(".syncd")
    ledger_url: str | None = None  # SQLAlchemy URL; None: <state_dir>/ledger.db
    # where experiments syncd creates keep their artifacts; None: beside a SQLite store
    # (<db folder>/mlartifacts), the server's default for other tracking URIs
    artifact_root: str | None = None
    health_addr: str = DEFAULT_HEALTH_ADDR  # "HOST:PORT"; "" or "off" disables
    roots: list[Root] = Field(default_factory=list)
    create_roots: bool = False  # `syncd run`: create missing local roots instead of failing
    watch: WatchConfig = Field(default_factory=WatchConfig)
    writer: WriterConfig = Field(default_factory=WriterConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        _refuse_remote_anchor(value, "tracking_uri")
        return resolve_sqlite_uri(value.strip(), Path.cwd())

    @field_validator("state_dir", mode="before")
    @classmethod
    def _check_state_dir(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        if isinstance(value, str) and "://" in value:
            raise ValueError(
                "must be a local folder (the ledger is a local SQLite file); use a local"
                " path such as /var/lib/syncd, or ledger_url for a shared PostgreSQL ledger"
            )
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return Path(_anchor(value, Path.cwd()))

    @field_validator("ledger_url")
    @classmethod
    def _check_ledger_url(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        _refuse_remote_anchor(value, "ledger_url")
        return resolve_sqlite_uri(value, Path.cwd()) if value else None

    @field_validator("artifact_root")
    @classmethod
    def _check_artifact_root(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        if "://" in value:
            return value
        return _anchor(value, Path.cwd())

    @field_validator("health_addr")
    @classmethod
    def _check_health_addr(cls, value: str) -> str:
        _parse_hostport(value)
        return value.strip()

    @property
    def ledger_url_resolved(self) -> str:
        """SQLAlchemy URL of the ledger (default: ``sqlite:///<state_dir>/ledger.db``)."""
        return self.ledger_url or f"sqlite:///{self.state_dir / 'ledger.db'}"

    @property
    def health_endpoint(self) -> tuple[str, int] | None:
        """``(host, port)`` to serve /healthz, /readyz, /metrics on; None when disabled."""
        return _parse_hostport(self.health_addr)


# --- loading ---------------------------------------------------------------------------


class _EnvSettings(BaseSettings, Settings):
    """Settings' fields as pydantic-settings sees them: SYNCD_ prefix, "__" nesting."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__")


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' SYNCD_* parsing, reading a given mapping instead of os.environ.

    It only turns variables into (nested) values; Settings validates them.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars() during super().__init__
        super().__init__(_EnvSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._environ.items()}


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings: defaults < YAML file at ``path`` < ``SYNCD_*`` env < ``overrides``.

    ``overrides`` maps field names (nested dicts or dotted keys such as ``"watch.mode"``)
    to values; ``None`` values are ignored. ``env`` defaults to ``os.environ``.
    Raises ConfigError naming the offending key, and the file (and line) when the
    problem is in the file.
    """
    environ = os.environ if env is None else env
    file_data: dict[str, Any] = {}
    lines: dict[_Loc, int] = {}
    if path is not None:
        file_data, lines = _read_yaml(Path(path))
        file_data = _anchor_file_paths(_drop_none(file_data), Path(path).absolute().parent)
    env_data = _read_env(environ)
    flag_data: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        flag_data = _merge(flag_data, _drop_none(nested))

    merged = _merge(_merge(file_data, env_data), flag_data)
    mlflow_data: dict[str, Any] = {}
    if "tracking_uri" not in merged and environ.get("MLFLOW_TRACKING_URI", "").strip():
        mlflow_data = {"tracking_uri": environ["MLFLOW_TRACKING_URI"]}
        merged.update(mlflow_data)

    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        sources: list[tuple[dict[str, Any], str]] = [
            (flag_data, "flags"),
            (env_data, "env"),
            (file_data, "file"),
            (mlflow_data, "mlflow"),
        ]
        problems = []
        for error in exc.errors():
            loc: _Loc = tuple(error["loc"])
            where = _origin(loc, sources, environ, path, lines)
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown key {_dotted(loc)!r}{where}")
                continue
            message = error["msg"].removeprefix("Value error, ")
            got = "" if error["type"] == "missing" else f" (got {_short(error['input'])})"
            problems.append(f"{_dotted(loc)}: {message}{got}{where}")
        if len(problems) == 1:
            raise ConfigError(problems[0]) from None
        raise ConfigError(
            f"{len(problems)} configuration errors:\n" + "\n".join(f"  {p}" for p in problems)
        ) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[_Loc, int]]:
    """The file's mapping and the 1-based line of every key/item in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        raise ConfigError(f"cannot read config file {path}: {reason}") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"invalid YAML in {path}{at}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, not {_short(data)}")
    return data, _key_lines(node)


def _key_lines(node: yaml.Node | None, prefix: _Loc = ()) -> dict[_Loc, int]:
    lines: dict[_Loc, int] = {}
    children: list[tuple[str | int, yaml.Node, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        children = [
            (key.value, key, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)
        ]
    elif isinstance(node, yaml.SequenceNode):
        children = [(index, item, item) for index, item in enumerate(node.value)]
    for name, mark_node, child in children:
        lines[(*prefix, name)] = mark_node.start_mark.line + 1
        lines.update(_key_lines(child, (*prefix, name)))
    return lines


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return _EnvSource(environ)()
    except SettingsError as exc:
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else f"{ENV_PREFIX}*"
        raise ConfigError(
            f"{name}: cannot parse environment value ({exc.__cause__ or exc})"
        ) from None


def _anchor_file_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve the file's relative paths against its folder (``base``)."""
    data = dict(data)
    for key in ("state_dir", "artifact_root"):
        if _is_local_path(data.get(key)):
            data[key] = _anchor(data[key], base)
    for key in ("tracking_uri", "ledger_url"):
        if isinstance(data.get(key), str):
            data[key] = resolve_sqlite_uri(data[key].strip(), base)
    if isinstance(data.get("roots"), list):
        data["roots"] = [
            _anchor(root, base)
            if _is_local_path(root)
            else _anchor_mapping({**root, "path": _anchor(root["path"], base)}, base)
            if isinstance(root, dict) and _is_local_path(root.get("path"))
            else _anchor_mapping(root, base)
            if isinstance(root, dict)
            else root
            for root in data["roots"]
        ]
    return data


def _anchor_mapping(root: dict[str, Any], base: Path) -> dict[str, Any]:
    if isinstance(root.get("mapping"), str):
        return {**root, "mapping": _anchor(root["mapping"], base)}
    return root


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    return value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings (``top`` wins); lists and scalars are replaced whole."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _contains(data: Any, loc: _Loc) -> bool:
    for part in loc:
        in_mapping = isinstance(data, Mapping) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_mapping or in_list):
            return False
        data = data[part]
    return True


def _origin(
    loc: _Loc,
    sources: list[tuple[dict[str, Any], str]],
    environ: Mapping[str, str],
    path: Path | None,
    lines: dict[_Loc, int],
) -> str:
    """Where the value at ``loc`` came from, as a message suffix ("" for a default)."""
    for size in range(len(loc), 0, -1):
        prefix = loc[:size]
        for data, kind in sources:
            if not _contains(data, prefix):
                continue
            if kind == "flags":
                return " (from command-line options)"
            if kind == "mlflow":
                return " (from environment variable MLFLOW_TRACKING_URI)"
            if kind == "env":
                return f" (from environment variable {_env_name(loc, environ)})"
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 0)
            return f" in {path}" + (f" (line {line})" if line else "")
    return ""


def _env_name(loc: _Loc, environ: Mapping[str, str]) -> str:
    names = {key.upper(): key for key in environ}
    keys = [str(part).upper() for part in loc if isinstance(part, str)]
    for size in range(len(keys), 0, -1):
        candidate = ENV_PREFIX + "__".join(keys[:size])
        if candidate in names:
            return names[candidate]
    return f"{ENV_PREFIX}*"


def _dotted(loc: _Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
