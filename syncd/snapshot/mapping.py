"""A snapshot mapping: which fields of a run directory's files become what in MLflow.

Values are templates: ``{meta.git_commit}`` is the field ``git_commit`` of the file
named ``meta`` under ``files``; a template that is exactly one reference keeps the
field's type (a number stays a number). ``{meta.total_rows?}`` is optional: a missing
or null field yields nothing instead of an error. ``{run_dir}`` and ``{run_dir_name}``
are the run directory and its last component. Text without braces is a literal;
``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from syncd.errors import ConfigError

BUILTINS = ("run_dir", "run_dir_name")
_REF = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Ref:
    """One ``{alias.path}`` reference of a template."""

    alias: str
    keys: tuple[str, ...]
    optional: bool

    @property
    def field(self) -> str:
        return ".".join((self.alias, *self.keys))


Part = str | Ref


def parse_template(text: str) -> list[Part]:
    """Literal text and references, in order; ValueError on a malformed reference."""
    parts: list[Part] = []
    pos = 0
    for match in _REF.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        else:
            inner = (match.group(1) or "").strip()
            optional = inner.endswith("?")
            inner = inner.rstrip("?").strip()
            pieces = inner.split(".") if inner else []
            if not pieces or any(not p for p in pieces):
                raise ValueError(f"malformed reference {token!r} in {text!r}")
            parts.append(Ref(pieces[0], tuple(pieces[1:]), optional))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts if p not in ("{", "}")):
        raise ValueError(f"unbalanced brace in {text!r}")
    return parts


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamsSpec(_Model):
    prefix: str = ""  # a template, e.g. "{meta.stage}/"
    fields: dict[str, str] = Field(default_factory=dict)  # param name -> template
    # Where a new value of a param already mirrored goes (params are write-once):
    # "tag" sets the tag ``changed.<param>``; "artifact" uploads the file(s) it came from
    # under ``changed/``.
    on_change: Literal["tag", "artifact"] = "tag"


class ArtifactSpec(_Model):
    path: str | None = None  # a file or folder of the run directory
    glob: str | None = None  # files of the run directory matching this pattern
    artifact_path: str | None = None  # default: the file's own folder (a glob), the root (a path)
    optional: bool | None = None  # default: a path is required, a glob may match nothing

    @model_validator(mode="after")
    def _one_of(self) -> ArtifactSpec:
        if (self.path is None) == (self.glob is None):
            raise ValueError("give exactly one of path or glob")
        return self

    @property
    def required(self) -> bool:
        return not self.optional if self.optional is not None else self.path is not None


class Mapping(_Model):
    """The parsed mapping file. ``files`` maps aliases to paths in the run directory; the
    first is the primary file (its presence makes a folder a run directory)."""

    format: Literal["snapshot"] = "snapshot"
    files: dict[str, str] = Field(min_length=1)
    record_id: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    parent: str | None = None
    mlflow_run_id: str | None = None
    status: str | None = None
    params: ParamsSpec = Field(default_factory=ParamsSpec)
    tags: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, str] = Field(default_factory=dict)
    artifacts: list[ArtifactSpec] = Field(default_factory=list)

    @field_validator("files")
    @classmethod
    def _relative_files(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, path in value.items():
            if alias in BUILTINS or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", alias):
                raise ValueError(f"file alias {alias!r}: use letters, digits and '_'")
            if path.startswith("/") or ".." in Path(path).parts or not path:
                raise ValueError(f"file {path!r}: must be relative to the run directory")
        return value

    @model_validator(mode="after")
    def _references(self) -> Mapping:
        for entry, template in self.templates():
            try:
                parts = parse_template(template)
            except ValueError as exc:
                raise ValueError(f"{entry}: {exc}") from None
            for part in parts:
                if isinstance(part, Ref) and part.alias not in self.files:
                    if part.alias in BUILTINS and not part.keys:
                        continue
                    raise ValueError(
                        f"{entry}: {{{part.field}}} names no file (files: {', '.join(self.files)})"
                    )
        return self

    @property
    def primary(self) -> str:
        return next(iter(self.files.values()))

    def templates(self) -> list[tuple[str, str]]:
        """Every (mapping entry, template) pair, entries spelt as in the file."""
        out: list[tuple[str, str]] = []
        for name in ("record_id", "experiment", "run_name", "parent", "mlflow_run_id", "status"):
            value = getattr(self, name)
            if value is not None:
                out.append((name, value))
        out.append(("params.prefix", self.params.prefix))
        out.extend((f"params.fields.{k}", v) for k, v in self.params.fields.items())
        out.extend((f"tags.{k}", v) for k, v in self.tags.items())
        out.extend((f"metrics.{k}", v) for k, v in self.metrics.items())
        for i, art in enumerate(self.artifacts):
            if art.artifact_path is not None:
                out.append((f"artifacts[{i}].artifact_path", art.artifact_path))
        return out


def cached_mapping(path: Path) -> Mapping:
    """``load_mapping``, read again only when the file changes."""
    try:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)
    return _cached(path, stamp)


@functools.lru_cache(maxsize=64)
def _cached(path: Path, stamp: tuple[int, int]) -> Mapping:
    return load_mapping(path)


def load_mapping(path: Path) -> Mapping:
    """Read and check a mapping file; ConfigError naming the file and the entry."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"mapping {path}: cannot read it: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"mapping {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"mapping {path}: expected a mapping of entries at the top")
    try:
        return Mapping.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise ConfigError(f"mapping {path}: " + "; ".join(problems)) from None


__all__ = ["ArtifactSpec", "Mapping", "ParamsSpec", "Ref", "load_mapping", "parse_template"]
