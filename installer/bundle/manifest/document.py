"""MANIFEST.json as a whole: :class:`Manifest` (reading, cross-checks, canonical writing, lookups), the
bundle and target headers and the artifact list."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from installer.bundle.manifest.environments import EnvironmentRecord
from installer.bundle.manifest.fields import FieldReader, kind_of
from installer.bundle.manifest.models import ModelRecord
from installer.bundle.manifest.record import Record
from installer.bundle.manifest.rules import (
    ARCHES,
    GLIBC_RE,
    NAME_RE,
    PLATFORMS,
    RUNTIME_ARTIFACT_RE,
    RUNTIME_PYTHON_RE,
    SHA256_RE,
    TOOL_RE,
    VERSION_RE,
)
from installer.bundle.manifest.services import ServiceRecord, port_conflicts
from installer.bundle.manifest.tasks import adapter_problems, task_problems
from installer.bundle.names import ARTIFACT_KINDS, FORMAT_VERSION, MANIFEST_NAME, PROVIDABLE_KINDS, PROVIDED
from installer.errors import BundleError


@dataclass(frozen=True)
class BundleInfo(Record):
    name: str
    version: str
    description: str = ""
    tool: str = ""

    @classmethod
    def read(cls, r: FieldReader) -> BundleInfo:
        return cls(name=r.str("name", NAME_RE, what="bundle name"),
                   version=r.str("version", VERSION_RE, what="bundle version"),
                   description=r.str("description", optional=True, text=True) or "",
                   tool=r.str("tool", TOOL_RE, optional=True, what="tool name") or "")


@dataclass(frozen=True)
class TargetInfo(Record):
    platform: str | None = None
    arch: str | None = None
    glibc: str | None = None

    @classmethod
    def read(cls, r: FieldReader) -> TargetInfo:
        return cls(platform=r.str("platform", choices=PLATFORMS, optional=True),
                   arch=r.str("arch", choices=ARCHES, optional=True),
                   glibc=r.str("glibc", GLIBC_RE, optional=True, what="glibc version"))


@dataclass(frozen=True)
class ArtifactRef(Record):
    """``runtime`` / ``installer``: which artifact holds the installer runtime or package."""

    artifact: str
    python: str | None = None

    @classmethod
    def read(cls, r: FieldReader) -> ArtifactRef:
        return cls(artifact=r.relpath("artifact"), python=r.relpath("python", optional=True))


@dataclass(frozen=True)
class ArtifactRecord(Record):
    path: str
    size: int
    sha256: str
    kind: str
    provided: str | None = None  # "target": left out of a delta bundle (the target has it)

    @classmethod
    def read(cls, r: FieldReader) -> ArtifactRecord:
        provided = r.str("provided", choices=(PROVIDED,), optional=True)
        kind = r.str("kind", choices=ARTIFACT_KINDS)
        if provided is not None and kind not in PROVIDABLE_KINDS:
            r.fail(("provided",), f"a {kind} artifact cannot be left to the target (only "
                   f"{', '.join(PROVIDABLE_KINDS)})")
        return cls(path=r.relpath("path", what="artifact path"), size=r.int("size"),
                   sha256=r.str("sha256", SHA256_RE, what="sha256"), kind=kind, provided=provided)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["provided"] is None:
            del out["provided"]
        return out


@dataclass(frozen=True)
class BaseRef(Record):
    """``delta.base[]``: a bundle version (or a server inventory) a delta was built against."""

    name: str | None = None
    version: str | None = None
    manifest_sha256: str | None = None

    @classmethod
    def read(cls, r: FieldReader) -> BaseRef:
        return cls(name=r.str("name", NAME_RE, optional=True, what="bundle name"),
                   version=r.str("version", VERSION_RE, optional=True, what="bundle version"),
                   manifest_sha256=r.str("manifest_sha256", SHA256_RE, optional=True, what="sha256"))


@dataclass(frozen=True)
class DeltaInfo(Record):
    """``delta``: what a delta bundle was built against (for `pack inspect` and the installer's refusal)."""

    against: str  # "inventory" or "bundle"
    base: tuple[BaseRef, ...] = ()

    @classmethod
    def read(cls, r: FieldReader) -> DeltaInfo:
        return cls(against=r.str("against", choices=("inventory", "bundle")),
                   base=tuple(BaseRef.read(FieldReader(b, r.path + ("base", i), r.source))
                              for i, b in enumerate(r.list("base"))))


@dataclass(frozen=True)
class Manifest(Record):
    """MANIFEST.json, validated. ``raw`` is the parsed JSON (for code that still reads the dict)."""

    bundle: BundleInfo
    target: TargetInfo
    artifacts: tuple[ArtifactRecord, ...] = ()
    runtime: ArtifactRef | None = None
    installer: ArtifactRef | None = None
    environments: tuple[EnvironmentRecord, ...] = ()
    models: tuple[ModelRecord, ...] = ()
    services: tuple[ServiceRecord, ...] = ()
    delta: DeltaInfo | None = None
    format_version: int = FORMAT_VERSION
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    # -- reading
    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = MANIFEST_NAME, partial: bool = False) -> Manifest:
        """Parse and validate MANIFEST.json bytes; raises :class:`BundleError` (a ManifestFieldError for a bad
        field, naming its JSON path). Refuses what ``json`` would quietly accept: duplicate keys, NaN and
        Infinity, text that is not UTF-8."""
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BundleError(f"{source}: not valid UTF-8 ({e})",
                                  hint="the manifest is corrupt; copy the bundle again") from e
        else:
            text = data
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise BundleError(f"{source}: not valid JSON ({why})",
                              hint="the manifest is corrupt; copy the bundle again") from e
        return cls.from_dict(obj, source=source, partial=partial)

    @classmethod
    def from_dict(cls, obj: Any, *, source: str = MANIFEST_NAME, partial: bool = False) -> Manifest:
        """Validate a parsed MANIFEST. ``partial``: a manifest assembled on the target (a bundle's manifest
        plus environments of installed bundles): every field is checked, but not ``format_version`` nor
        that each artifact named is listed in ``artifacts``."""
        if not isinstance(obj, dict):
            raise BundleError(f"{source}: expected a JSON object, found {kind_of(obj)}")
        version = obj.get("format_version", FORMAT_VERSION if partial else None)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BundleError(f"{source}: bundle format version {version!r} is not supported "
                              f"(this tool reads version {FORMAT_VERSION})",
                              hint="use the installer that came with the bundle, or rebuild it")
        r = FieldReader(obj, (), source)
        arts = tuple(ArtifactRecord.read(FieldReader(a, ("artifacts", i), source))
                     for i, a in enumerate(r.list("artifacts")))
        runtime = r.child("runtime", optional=True)
        installer = r.child("installer", optional=True)
        if runtime is not None:
            runtime.str("artifact", RUNTIME_ARTIFACT_RE, what="runtime artifact (runtime/<env>.tar.gz)")
            runtime.str("python", RUNTIME_PYTHON_RE, what="runtime python (bin/python3.N, as install.sh accepts)")
        if installer is not None:
            installer.str("artifact", choices=("installer.tar.gz",))
        target = r.child("target", optional=True)
        delta = r.child("delta", optional=True)
        m = cls(
            bundle=BundleInfo.read(r.child("bundle")),
            target=TargetInfo.read(target) if target is not None else TargetInfo(),
            artifacts=arts,
            runtime=ArtifactRef.read(runtime) if runtime is not None else None,
            installer=ArtifactRef.read(installer) if installer is not None else None,
            environments=tuple(EnvironmentRecord.read(FieldReader(e, ("environments", i), source))
                               for i, e in enumerate(r.list("environments"))),
            models=tuple(ModelRecord.read(FieldReader(x, ("models", i), source))
                         for i, x in enumerate(r.list("models"))),
            services=tuple(ServiceRecord.read(FieldReader(s, ("services", i), source))
                           for i, s in enumerate(r.list("services"))),
            delta=DeltaInfo.read(delta) if delta is not None else None,
            format_version=version,
            raw=obj,
        )
        m._cross_check(r, partial=partial)
        return m

    def _cross_check(self, r: FieldReader, *, partial: bool = False) -> None:
        for section in ("artifacts", "environments", "models", "services"):
            seen: dict[str, int] = {}
            key = "path" if section == "artifacts" else "name"
            for i, item in enumerate(getattr(self, section)):
                v = getattr(item, key)
                if v in seen:
                    r.fail((section, i, key), f"{v!r} is listed twice (also {section}[{seen[v]}])")
                seen[v] = i
        listed = {a.path for a in self.artifacts}
        for i, a in enumerate(self.artifacts):
            if a.path in (MANIFEST_NAME, MANIFEST_NAME + ".sig"):
                r.fail(("artifacts", i, "path"), f"{a.path!r} is reserved")
        for path, msg in adapter_problems([m.to_dict() for m in self.models], [s.to_dict() for s in self.services]):
            r.fail(path, msg)
        for i, s in enumerate(self.services):
            env = self.environment(s.environment)
            version = env.vllm.version if env is not None and env.vllm is not None else None
            for rel, msg in task_problems(s.to_dict(), version):
                r.fail(("services", i, *rel), msg)
        ports = port_conflicts((s.host, s.port) for s in self.services)
        for i, j in ports:
            s = self.services[i]
            r.fail(("services", i, "port"), f"port {s.port} on {s.host} is already used by services[{j}]")
        if partial:
            return
        for key, ref in (("runtime", self.runtime), ("installer", self.installer)):
            if ref is not None and ref.artifact not in listed:
                r.fail((key, "artifact"), f"{ref.artifact!r} is not listed in artifacts")
        for i, e in enumerate(self.environments):
            if e.artifact is not None and e.artifact not in listed:
                r.fail(("environments", i, "artifact"), f"{e.artifact!r} is not listed in artifacts")

    # -- writing
    def to_dict(self) -> dict:
        out = super().to_dict()
        del out["raw"]
        if out["delta"] is None:
            del out["delta"]
        for key in ("runtime", "installer"):
            if out[key] is not None and out[key].get("python") is None and key == "installer":
                out[key].pop("python")
        return out

    def to_json(self) -> bytes:
        """Canonical MANIFEST.json bytes (the serialisation of installer/bundle/reader.py's canonical_json)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    # -- lookups
    def environment(self, name: str | None) -> EnvironmentRecord | None:
        return next((e for e in self.environments if e.name == name), None)

    def model(self, name: str | None) -> ModelRecord | None:
        return next((m for m in self.models if m.name == name), None)

    def service(self, name: str | None) -> ServiceRecord | None:
        return next((s for s in self.services if s.name == name), None)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ------------------------------------------------------------------------ accepting either form


def as_manifest(m: Manifest | Mapping, *, source: str = MANIFEST_NAME) -> Manifest:
    """A :class:`Manifest` from a record or a parsed MANIFEST dict (validated)."""
    return m if isinstance(m, Manifest) else Manifest.from_dict(dict(m), source=source, partial=True)
