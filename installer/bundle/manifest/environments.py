"""The environments of a MANIFEST: :class:`EnvironmentRecord` and the vLLM it carries (:class:`VllmInfo`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from installer.bundle.manifest.fields import FieldReader, check_json_value, kind_of
from installer.bundle.manifest.record import FrozenDict, Record, freeze
from installer.bundle.manifest.rules import (
    CUDA_RE,
    CUDA_RUNTIME_RE,
    DRIVER_RE,
    GLIBC_RE,
    MODULE_RE,
    NAME_RE,
    PLATFORMS,
    PYTHON_RE,
    SHA256_RE,
    SONAME_RE,
    VERSION_RE,
    abs_path_problem,
    relpath_problem,
    value_problem,
)
from installer.bundle.names import MANIFEST_NAME


@dataclass(frozen=True)
class VllmInfo(Record):
    version: str | None = None
    command: tuple[str, ...] = ()
    distribution: str | None = None

    @classmethod
    def read(cls, r: FieldReader) -> VllmInfo:
        cmd = r.list("command")
        for i, c in enumerate(cmd):
            r.check_str(c, ("command", i), None)
        if len(cmd) >= 3 and cmd[1] == "-m":
            bad = relpath_problem(cmd[0])
            if bad:
                r.fail(("command", 0), bad)
            if not MODULE_RE.fullmatch(cmd[2]):
                r.fail(("command", 2), f"{cmd[2]!r} is not a Python module name")
        elif cmd:
            for i, c in enumerate(cmd):
                bad = relpath_problem(c) if i == 0 else value_problem(c)
                if bad:
                    r.fail(("command", i), bad)
        return cls(version=r.str("version", VERSION_RE, optional=True, what="vLLM version"), command=tuple(cmd),
                   distribution=r.str("distribution", NAME_RE, optional=True, what="distribution name"))


@dataclass(frozen=True)
class EnvFrame(Record):
    """One independent zstd frame of an environment archive: its byte range and sha256."""

    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class EnvironmentRecord(Record):
    """A packed environment (``artifact`` + ``content_hash``), or one the server already has (``existing``:
    the absolute prefix holding ``bin/python`` with vLLM; nothing is carried, the installer checks it)."""

    name: str
    artifact: str | None = None
    content_hash: str | None = None
    existing: str | None = None
    compiler: str | None = None  # a C compiler carried in the environment, relative to its prefix
    python: str | None = None
    platform: str | None = None
    cuda: str | None = None
    cuda_runtime: str | None = None
    min_driver: str | None = None
    driver_floor: str | None = None
    glibc: str | None = None
    archive_size: int | None = None
    unpacked_size: int | None = None
    files: int | None = None
    vllm: VllmInfo | None = None
    needed_libraries: tuple[str, ...] = ()
    needed_by: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: FrozenDict())
    lock: Mapping | None = None
    # the archive's independent zstd frames, decoded in parallel (installer/unpack/frames.py)
    frames: tuple[EnvFrame, ...] = ()

    @classmethod
    def read(cls, r: FieldReader) -> EnvironmentRecord:
        name = r.str("name", NAME_RE, what="environment name")
        existing = r.str("existing", None, optional=True, what="path")
        if existing is not None:
            bad = abs_path_problem(existing)
            if bad:
                r.fail(("existing",), bad)
            for key in ("artifact", "content_hash", "lock", "needed_libraries", "needed_by", "frames"):
                if r.obj.get(key):
                    r.fail((key,), f"an existing environment ({existing}) has no {key}: nothing is carried")
            artifact = content_hash = None
        else:
            artifact = r.relpath("artifact")
            if artifact != f"envs/{name}.tar.zst":
                r.fail(("artifact",), f"{artifact!r} is not envs/{name}.tar.zst")
            content_hash = r.str("content_hash", SHA256_RE, what="content hash (64 hex digits)")
        frames = []
        for i, fr in enumerate(r.list("frames", optional=True) or []):
            fr_r = FieldReader(fr, r.path + ("frames", i), r.source)
            frames.append(EnvFrame(offset=fr_r.int("offset"), size=fr_r.int("size", minimum=1),
                                   sha256=fr_r.str("sha256", SHA256_RE, what="sha256")))
        pos = 0
        for i, fr in enumerate(frames):
            if fr.offset != pos:
                r.fail(("frames", i, "offset"), f"frame {i} starts at {fr.offset}, expected {pos} (no gaps)")
            pos += fr.size
        needed_by = r.child("needed_by", optional=True)
        nb: dict[str, tuple[str, ...]] = {}
        if needed_by is not None:
            for lib, paths in needed_by.obj.items():
                r.check_str(lib, ("needed_by", lib), SONAME_RE, what="library name")
                if not isinstance(paths, list):
                    r.fail(("needed_by", lib), f"expected a list, found {kind_of(paths)}")
                nb[lib] = tuple(r.check_str(p, ("needed_by", lib, i), None) for i, p in enumerate(paths))
        vllm = r.child("vllm", optional=True)
        lock = r.raw("lock", optional=True)
        if lock is not None:
            if not isinstance(lock, dict):
                r.fail(("lock",), f"expected an object, found {kind_of(lock)}")
            check_json_value(r, lock, ("lock",))
        return cls(
            name=name, artifact=artifact, content_hash=content_hash, existing=existing,
            compiler=r.relpath("compiler", optional=True, what="compiler path"),
            python=r.str("python", PYTHON_RE, optional=True, what="Python version"),
            platform=r.str("platform", choices=PLATFORMS, optional=True),
            cuda=r.str("cuda", CUDA_RE, optional=True, what="CUDA version (like 12.8)"),
            cuda_runtime=r.str("cuda_runtime", CUDA_RUNTIME_RE, optional=True, what="CUDA runtime version"),
            min_driver=r.str("min_driver", DRIVER_RE, optional=True, what="driver version"),
            driver_floor=r.str("driver_floor", DRIVER_RE, optional=True, what="driver version"),
            glibc=r.str("glibc", GLIBC_RE, optional=True, what="glibc version"),
            archive_size=r.int("archive_size", optional=True),
            unpacked_size=r.int("unpacked_size", optional=True),
            files=r.int("files", optional=True),
            vllm=VllmInfo.read(vllm) if vllm is not None else None,
            needed_libraries=r.str_list("needed_libraries", SONAME_RE, what="library name"),
            needed_by=FrozenDict(nb),
            lock=freeze(lock) if lock is not None else None,
            frames=tuple(frames),
        )

    @property
    def is_cpu(self) -> bool:
        return not self.cuda

    @property
    def is_existing(self) -> bool:
        return self.existing is not None


def as_environment(e: EnvironmentRecord | Mapping, *, path: tuple = ("environments", 0)) -> EnvironmentRecord:
    return e if isinstance(e, EnvironmentRecord) else EnvironmentRecord.read(FieldReader(dict(e), path, MANIFEST_NAME))
