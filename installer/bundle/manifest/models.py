"""The models of a MANIFEST: :class:`ModelRecord` and its files (:class:`ModelFile`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from installer.bundle.manifest.fields import FieldReader, check_json_value, kind_of
from installer.bundle.manifest.record import FrozenDict, Record, freeze
from installer.bundle.manifest.rules import (
    CLIMB_RE,
    COMMIT_RE,
    NAME_RE,
    REPO_RE,
    REVISION_RE,
    SHA256_RE,
    SOURCES,
    URL_RE,
)

HEX40_RE = re.compile(r"[0-9a-f]{40}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelFile(Record):
    path: str
    size: int
    sha256: str

    @classmethod
    def read(cls, r: FieldReader) -> ModelFile:
        return cls(path=r.relpath("path"), size=r.int("size"), sha256=r.str("sha256", SHA256_RE, what="sha256"))


@dataclass(frozen=True)
class AdapterInfo(Record):
    """A LoRA adapter's facts (``models[].adapter``): the model it adapts and its rank (adapter_config.json)."""

    base: str
    rank: int

    @classmethod
    def read(cls, r: FieldReader) -> AdapterInfo:
        if not isinstance(r.obj, dict):
            r.fail((), f"expected an object, found {kind_of(r.obj)}")
        r.only_keys(("base", "rank"))
        return cls(base=r.str("base", NAME_RE, what="model name"), rank=r.int("rank", minimum=1, maximum=65536))


@dataclass(frozen=True)
class ModelRecord(Record):
    name: str
    source: str
    commit: str
    dir: str
    files: tuple[ModelFile, ...] = ()
    size: int = 0
    repo: str | None = None
    revision: str | None = None
    endpoint: str | None = None
    config: Mapping = field(default_factory=lambda: FrozenDict())
    pinned_by: str | None = None  # "commit" (the hub's commit id) or "content" (content_hash; ModelScope branches)
    content_hash: str | None = None
    hub_file_commits: tuple[str, ...] = ()
    adapter: AdapterInfo | None = None  # a LoRA adapter of the model adapter.base (written only when set)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("adapter") is None:
            out.pop("adapter", None)
        return out

    @classmethod
    def read(cls, r: FieldReader) -> ModelRecord:
        name = r.str("name", NAME_RE, what="model name")
        d = r.relpath("dir")
        if d != f"models/{name}":
            r.fail(("dir",), f"{d!r} is not models/{name}")
        files = tuple(ModelFile.read(FieldReader(f, r.path + ("files", i), r.source))
                      for i, f in enumerate(r.list("files")))
        seen: set[str] = set()
        for i, f in enumerate(files):
            if f.path in seen:
                r.fail(("files", i, "path"), f"{f.path!r} is listed twice")
            seen.add(f.path)
        revision = r.str("revision", REVISION_RE, optional=True, what="revision")
        if revision is not None and ".." in revision:
            r.fail(("revision",), f"{revision!r} is not a valid revision")
        config = r.raw("config", optional=True)
        if config is not None:
            if not isinstance(config, dict):
                r.fail(("config",), f"expected an object, found {kind_of(config)}")
            check_json_value(r, config, ("config",))
        size = r.int("size", optional=True, default=None)
        if size is None:
            size = sum(f.size for f in files)
        return cls(name=name, source=r.str("source", choices=SOURCES),
                   commit=r.str("commit", COMMIT_RE, what="commit (40 or 64 hex digits)"),
                   dir=d, files=files, size=size,
                   repo=r.str("repo", REPO_RE, optional=True, what="repository id (org/name)"),
                   revision=revision,
                   endpoint=_endpoint(r),
                   config=freeze(config or {}),
                   pinned_by=r.str("pinned_by", optional=True, choices=("commit", "content")),
                   content_hash=r.str("content_hash", HEX64_RE, optional=True, what="content hash (64 hex digits)"),
                   hub_file_commits=r.str_list("hub_file_commits", HEX40_RE, what="commit id (40 hex digits)"),
                   adapter=_adapter(r))


def _adapter(r: FieldReader) -> AdapterInfo | None:
    child = r.child("adapter", optional=True)
    return AdapterInfo.read(child) if child is not None else None


def _endpoint(r: FieldReader) -> str | None:
    v = r.str("endpoint", URL_RE, optional=True, what="endpoint URL")
    if v is not None and CLIMB_RE.search(v):
        r.fail(("endpoint",), f"{v!r} is not a valid endpoint URL ('..' in the path)")
    return v
