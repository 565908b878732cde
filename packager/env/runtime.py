"""Cut the installer runtime out of a built environment.

**cut_runtime** writes ``runtime/<env>.tar.gz``: the env's interpreter, the shared libraries it and its
extension modules load from the env, the stdlib (without tests, idlelib, tkinter, ensurepip, bytecode
caches) and the ``zstandard`` module, so ``install.sh`` can run the installer on a server without Python
or zstd. It runs relocated: ``<dir>/bin/python3.X -I`` from any directory.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from packager.env.build import BuiltEnv
from packager.env.elf import GLIBC_SONAMES, read_elf
from packager.env.install import run_env
from packager.env.pack import PackResult
from packager.env.pip import pip_args
from packager.errors import EnvironmentBuildError
from packager.tarball import write_tar_gz

RUNTIME_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
                     "ensurepip", "__pycache__", "lib2to3"}
RUNTIME_SKIP_PREFIXES = ("config-",)
RUNTIME_SKIP_MODULES = ("_tkinter", "_test", "xxlimited", "xxsubtype", "_xxtestfuzz", "_ctypes_test")


def cut_runtime(built: BuiltEnv, dest: Path) -> PackResult:
    """Write ``dest`` (runtime/<env>.tar.gz): python + needed env libs + stdlib + zstandard."""
    t0 = time.monotonic()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = built.prefix
    py = f"python{built.python_short}"
    interp = prefix / "bin" / py
    stdlib = prefix / "lib" / py
    if not interp.exists() or not (stdlib / "os.py").is_file():
        raise EnvironmentBuildError(f"environment {built.spec.name}: no {py} interpreter/stdlib in {prefix}",
                                    hint="the first environment must contain python")
    entries: dict[str, Path] = {f"bin/{py}": interp.resolve()}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = Path(dirpath).relative_to(stdlib)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in RUNTIME_SKIP_DIRS and not (rel == Path(".") and
                                                                   d.startswith(RUNTIME_SKIP_PREFIXES)))
        for fn in filenames:
            if fn.endswith((".pyc", ".pyo")) or (rel.name == "lib-dynload" and fn.startswith(RUNTIME_SKIP_MODULES)):
                continue
            src = Path(dirpath, fn)
            if src.is_file():
                entries[f"lib/{py}/{(rel / fn).as_posix()}"] = src.resolve()
    with tempfile.TemporaryDirectory(prefix="llm-runtime-") as tmp:
        zst_dir = _zstandard_source(built, Path(tmp))
        for dirpath, dirnames, filenames in os.walk(zst_dir / "zstandard"):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in filenames:
                if not fn.endswith((".pyc", ".pyo")):
                    src = Path(dirpath, fn)
                    entries[f"lib/{py}/site-packages/{src.relative_to(zst_dir).as_posix()}"] = src.resolve()
        for soname, src in _needed_env_libs(prefix, [p for a, p in entries.items() if _elfish(a)]).items():
            entries[f"lib/{soname}"] = src
        wf = write_tar_gz(dest, sorted(entries.items()), level=6)
        unpacked = sum(p.stat().st_size for p in entries.values())
    return PackResult(wf.path, wf.sha256, wf.size, unpacked, len(entries), time.monotonic() - t0)


def _elfish(arcname: str) -> bool:
    return arcname.startswith("bin/") or arcname.endswith(".so") or ".so." in arcname


def _zstandard_source(built: BuiltEnv, tmp: Path) -> Path:
    """A directory holding the ``zstandard`` package for the env's python (the env's own, else pip --target)."""
    site = built.prefix / "lib" / f"python{built.python_short}" / "site-packages"
    if (site / "zstandard" / "__init__.py").is_file():
        return site
    target = tmp / "zstd"
    run_env(built.prefix, ["-m", "pip", "install", "--no-warn-script-location", "--no-compile", "--target",
                           str(target), *pip_args(built.spec.pip), "zstandard"],
            progress=False, what=f"environment {built.spec.name}: pip install --target zstandard (installer runtime)",
            hint="the installer runtime needs the zstandard module: make it installable (index or find_links), "
            "or add zstandard to the environment's pip: packages")
    return target


def _needed_env_libs(prefix: Path, elf_files: list[Path]) -> dict[str, Path]:
    """Shared libraries (by soname) from ``<prefix>/lib`` that ``elf_files`` load, transitively."""
    libdir = prefix / "lib"
    found: dict[str, Path] = {}
    todo = list(elf_files)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        info = read_elf(path)
        if info is None:
            continue
        for lib in info.needed:
            if lib in found or lib in GLIBC_SONAMES:
                continue
            cand = libdir / lib
            if cand.exists():
                found[lib] = cand.resolve()
                todo.append(found[lib])
    return found
