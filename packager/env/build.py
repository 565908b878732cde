"""The whole environment build (solve, install, pip layer, facts) and its reuse stamp; ``inspect_env`` for a
``prefix:`` env built by hand."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from installer.preflight.cuda import compare_versions
from packager.env.compiler import check_compiler, compiler_specs
from packager.env.elf import scan_tree
from packager.env.facts import (
    check_conda_files,
    check_cuda,
    check_no_editable,
    detect_cuda_runtime,
    detect_vllm,
    pip_lock_entries,
    read_conda_meta,
)
from packager.env.install import clear_prefix, install
from packager.env.licenses import env_licenses
from packager.env.pip import download_kernels, pip_install, pip_uninstall
from packager.env.solve import conda_specs, solve
from packager.errors import EnvironmentBuildError
from packager.spec import EnvSpec, TargetSpec

HASH_FORMAT = 1
STAMP_NAME = "build-stamp.json"  # beside the prefix, never inside it (never packed)


def _inputs_key(records: list, spec: EnvSpec, target: TargetSpec) -> str:
    doc = {"records": sorted(f"{r.url} {r.sha256.hex() if isinstance(r.sha256, bytes) else r.sha256}"
                             for r in records),
           "pip": dataclasses.asdict(spec.pip), "download_kernels": spec.download_kernels,
           "target": dataclasses.asdict(target), "format": HASH_FORMAT}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _stamp_matches(stamp: Path, key: str) -> bool:
    try:
        return json.loads(stamp.read_text()).get("key") == key and (stamp.parent / "prefix" / "conda-meta").is_dir()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class BuiltEnv:
    spec: EnvSpec
    prefix: Path
    python_version: str
    cuda_runtime: str | None
    lock: dict  # {"conda": [{name, version, build, url, sha256}], "pip": [{name, version, sha256}]}
    content_hash: str  # sha256 over canonical lock json + target + spec
    vllm: dict | None  # {"version", "distribution", "command": [...]}
    needed_libraries: list[str]
    needed_by: dict = field(default_factory=dict, compare=False)  # soname -> up to 3 env files needing it
    glibc_floor: str | None = None  # newest GLIBC_x.y symbol version the env's ELF files need
    target: TargetSpec = field(default_factory=TargetSpec)
    cuda_runtime_source: str | None = None  # where cuda_runtime was read, e.g. "torch 2.8.0+cu128"
    compiler: str | None = None  # the C compiler the env carries, relative to the prefix (spec.compiler only)
    # {"conda": {name: license}, "pip": {name: [licenses]}} from the packages' own metadata: for the SBOM only,
    # not in the lock nor the content hash (packager/env/licenses.py)
    licenses: dict = field(default_factory=dict, compare=False)
    timings: dict = field(default_factory=dict, compare=False)  # seconds: solve, install, pip, inspect

    @property
    def python_short(self) -> str:
        return ".".join(self.python_version.split(".")[:2])


@contextlib.contextmanager
def env_lock(d: Path, name: str):
    """One build of an environment directory at a time: a second `pack build` of the same environment (same
    work dir) waits here, saying so, instead of installing into the same prefix at the same moment."""
    import fcntl
    import os

    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"environment {name}: another pack build (pid {holder}) is building {d}; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def build_env(spec: EnvSpec, target: TargetSpec, work: Path, *, channels_override=None, progress: bool = True,
              pkgs_dir: Path | None = None) -> BuiltEnv:
    """Build (or, for ``spec.prefix``, inspect) environment ``spec`` for ``target`` under ``work``."""
    if spec.prefix is not None:
        return inspect_env(spec, target)
    work = Path(work).resolve()
    prefix = work / spec.name / "prefix"
    with env_lock(prefix.parent, spec.name):
        return _build_env(spec, target, work, prefix, channels_override=channels_override, progress=progress,
                          pkgs_dir=pkgs_dir)


def _build_env(spec: EnvSpec, target: TargetSpec, work: Path, prefix: Path, *, channels_override, progress: bool,
               pkgs_dir: Path | None) -> BuiltEnv:
    pkgs = Path(pkgs_dir) if pkgs_dir else work / "pkgs"
    channels = list(channels_override or spec.channels)
    specs = conda_specs(spec)
    specs += compiler_specs(spec, target, specs)
    timings: dict[str, float] = {}

    t = time.monotonic()
    records = solve(specs, channels, target, cuda=spec.cuda, cache_dir=work / "repodata", env_name=spec.name)
    timings["solve"] = time.monotonic() - t

    # Reuse the prefix when nothing that went into it changed: the solved records (url + sha256), the pip
    # layer and the target. A stamp is written only once the whole build succeeded.
    key = _inputs_key(records, spec, target)
    stamp = prefix.parent / STAMP_NAME
    if _stamp_matches(stamp, key):
        timings["reused"] = 1.0
        report = json.loads(stamp.read_text()).get("pip_report", {})
        return _finish(spec, target, prefix, report, timings)

    t = time.monotonic()
    stamp.unlink(missing_ok=True)
    clear_prefix(prefix)
    install(records, prefix, pkgs, specs=specs, progress=progress)
    timings["install"] = time.monotonic() - t

    t = time.monotonic()
    report: dict = {}
    if spec.pip.packages:
        report = pip_install(prefix, spec.pip, progress=progress, env_name=spec.name)
    if spec.pip.remove:
        pip_uninstall(prefix, spec.pip.remove, progress=progress, env_name=spec.name)
    timings["pip"] = time.monotonic() - t

    if spec.download_kernels:
        t = time.monotonic()
        if download_kernels(prefix, progress=progress, env_name=spec.name):
            timings["download_kernels"] = time.monotonic() - t
    built = _finish(spec, target, prefix, report, timings)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "pip_report": report}))
    os.replace(tmp, stamp)
    return built


def inspect_env(spec: EnvSpec, target: TargetSpec) -> BuiltEnv:
    """The ``prefix:`` form: lock and facts of an environment built by hand (``conda create`` + pip)."""
    prefix = Path(spec.prefix).expanduser().resolve()
    if not (prefix / "conda-meta").is_dir():
        raise EnvironmentBuildError(
            f"environment {spec.name}: {prefix} is not a conda environment (no conda-meta/)",
            hint="point prefix: at the directory `conda create -p` made (the one holding bin/ and conda-meta/)")
    return _finish(spec, target, prefix, {}, {})


def _finish(spec: EnvSpec, target: TargetSpec, prefix: Path, report: dict, timings: dict) -> BuiltEnv:
    t = time.monotonic()
    conda_meta = read_conda_meta(prefix)
    python = next((m for m in conda_meta if m["name"] == "python"), None)
    if python is None:
        raise EnvironmentBuildError(f"environment {spec.name}: no python package in {prefix}",
                                    hint="add python to conda: (or set python: \"3.12\")")
    python_version = python["version"]
    site = prefix / "lib" / f"python{'.'.join(python_version.split('.')[:2])}" / "site-packages"
    check_conda_files(spec.name, prefix, conda_meta)
    check_no_editable(spec.name, site)
    pip_lock = pip_lock_entries(prefix, site, conda_meta, report)
    conda_lock = [{"name": m["name"], "version": m["version"], "build": m.get("build", ""),
                   "url": m.get("url", ""), "sha256": m.get("sha256") or None}
                  | ({"md5": m["md5"]} if not m.get("sha256") and m.get("md5") else {})
                  for m in sorted(conda_meta, key=lambda m: m["name"])]
    lock = {"conda": conda_lock, "pip": pip_lock}
    cuda_runtime, cuda_source = detect_cuda_runtime(site, conda_lock, pip_lock)
    check_cuda(spec, cuda_runtime, cuda_source)
    scan = scan_tree(prefix)
    if scan.glibc and compare_versions(scan.glibc, target.glibc) > 0:
        raise EnvironmentBuildError(
            f"environment {spec.name}: {scan.glibc_file} needs glibc {scan.glibc}; the manifest targets "
            f"glibc {target.glibc}",
            hint=f"if every target server has glibc >= {scan.glibc}, raise target.glibc; otherwise pin the "
            "package that brought this file to a build for an older glibc (e.g. a manylinux_2_28 wheel)")
    compiler = check_compiler(spec, target, prefix)
    timings["inspect"] = time.monotonic() - t
    return BuiltEnv(
        spec=spec, prefix=prefix, python_version=python_version, cuda_runtime=cuda_runtime, lock=lock,
        content_hash=content_hash(lock, target, spec), vllm=detect_vllm(site, pip_lock),
        needed_libraries=sorted(scan.needed), needed_by={k: v[:3] for k, v in scan.needed.items()},
        glibc_floor=scan.glibc, target=target,
        cuda_runtime_source=cuda_source, compiler=compiler, timings=timings,
        licenses=env_licenses(site, conda_meta, pip_lock))


def content_hash(lock: dict, target: TargetSpec, spec: EnvSpec) -> str:
    spec_d = dataclasses.asdict(spec)
    spec_d["prefix"] = str(spec.prefix) if spec.prefix else None
    if not spec.compiler:
        del spec_d["compiler"]  # an environment without a compiler keeps the hash it had before the field
    doc = {"format": HASH_FORMAT, "lock": lock, "spec": spec_d,
           "target": {"platform": target.platform, "glibc": target.glibc}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
