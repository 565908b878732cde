"""The C compiler a CUDA environment carries: the conda specs that bring it and the fact of which one it has.

vLLM on CUDA compiles Triton's launcher with a C compiler at every start, against the environment's
``Python.h``; a server without gcc cannot start it ("Failed to find C compiler. Please specify via CC").
So an environment with ``cuda:`` gets conda-forge's ``gcc_<platform>`` and ``sysroot_<platform>`` (the
sysroot for the target's glibc) unless the manifest says ``compiler: false``; after the install the compiler
inside is found (:func:`detect_compiler`) and recorded in MANIFEST.json (``environments[].compiler``,
relative to the prefix), where the installer's preflight and env files find it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from packager.errors import EnvironmentBuildError
from packager.spec import EnvSpec, TargetSpec

# conda-forge's sysroot_linux-64 / sysroot_linux-aarch64 builds (glibc versions), oldest first
SYSROOT_VERSIONS = ("2.17", "2.28", "2.34", "2.39")


def _vt(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def sysroot_version(glibc: str) -> str | None:
    """The newest conda-forge sysroot not newer than the target's ``glibc`` (what is linked against it runs
    there); None below the oldest (2.17)."""
    fits = [v for v in SYSROOT_VERSIONS if _vt(v) <= _vt(glibc)]
    return fits[-1] if fits else None


def compiler_packages(target: TargetSpec) -> tuple[str, str]:
    """(compiler package, sysroot package) names for the target's platform."""
    return f"gcc_{target.platform}", f"sysroot_{target.platform}"


def compiler_specs(spec: EnvSpec, target: TargetSpec, specs: list[str]) -> list[str]:
    """The specs to add to ``specs`` for ``spec.compiler`` (none that ``specs`` already names)."""
    if not spec.compiler or spec.prefix is not None:
        return []
    gcc, sysroot = compiler_packages(target)
    version = sysroot_version(target.glibc)
    if version is None:
        raise EnvironmentBuildError(
            f"environment {spec.name}: conda-forge has no {sysroot} for target glibc {target.glibc} (the "
            f"oldest is {SYSROOT_VERSIONS[0]})", hint="raise target.glibc, or set compiler: false (the server "
            "then needs its own C compiler)")
    named = {re.split(r"[\s=<>!~\[]", s.strip(), maxsplit=1)[0] for s in specs}
    return [s for s in (gcc, f"{sysroot} {version}.*") if s.split()[0] not in named]


def candidates(target: TargetSpec) -> tuple[str, ...]:
    """Where an environment keeps its C compiler, in the order it is looked for (relative to the prefix)."""
    triplet = f"{target.arch}-conda-linux-gnu"
    return (f"bin/{triplet}-cc", f"bin/{triplet}-gcc", "bin/cc", "bin/gcc")


def detect_compiler(prefix: Path, target: TargetSpec) -> str | None:
    """The first compiler of :func:`candidates` that ``prefix`` has (an executable file), relative."""
    for rel in candidates(target):
        p = Path(prefix) / rel
        if p.is_file() and os.access(p, os.X_OK):
            return rel
    return None


def check_compiler(spec: EnvSpec, target: TargetSpec, prefix: Path) -> str | None:
    """The compiler to record for ``spec`` (None when it asks for none); an error when it asks for one and
    ``prefix`` has none."""
    if not spec.compiler:
        return None
    found = detect_compiler(prefix, target)
    if found is not None:
        return found
    gcc, sysroot = compiler_packages(target)
    version = sysroot_version(target.glibc) or SYSROOT_VERSIONS[0]
    how = (f"install one into it (conda install -p {prefix} -c conda-forge {gcc} '{sysroot} {version}.*')"
           if spec.prefix is not None
           else f"make sure the channels' {gcc} provides bin/{target.arch}-conda-linux-gnu-cc")
    raise EnvironmentBuildError(
        f"environment {spec.name}: no C compiler in {prefix} (looked for {', '.join(candidates(target))}); vLLM "
        "compiles Triton's launcher at every GPU start and cannot start without one",
        hint=f"{how}, or set compiler: false in the manifest (the server then needs its own gcc, or "
        "services[].env.CC)")
