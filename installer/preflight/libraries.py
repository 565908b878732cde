"""Preflight check of the system libraries an environment needs and does not carry (with the package to install)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from installer.bundle.manifest import EnvironmentRecord
from installer.preflight.context import FAIL, PASS, WARN, CheckResult, _Context
from installer.preflight.host import _LIB_DIRS

LIBRARY_PACKAGES = Path(__file__).resolve().parent.parent / "data" / "library_packages.json"


def _ld_so_conf_dirs(root: Path) -> list[Path]:
    dirs: list[Path] = []
    confs = [root / "etc/ld.so.conf"]
    seen = set()
    while confs:
        conf = confs.pop()
        if conf in seen or not conf.is_file():
            continue
        seen.add(conf)
        for line in conf.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("include"):
                pattern = line.split(None, 1)[1].lstrip("/")
                confs.extend(sorted(root.glob(pattern)))
            elif line.startswith("/"):
                dirs.append(root / line.lstrip("/"))
    return dirs


def system_libraries(root: Path = Path("/")) -> set[str]:
    """Sonames this server provides: ``ldconfig -p`` (running system) plus the standard and ld.so.conf dirs."""
    names: set[str] = set()
    root = Path(root)
    if root.resolve() == Path("/"):
        ldconfig = shutil.which("ldconfig") or next(
            (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
        if ldconfig:
            try:
                text = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30,
                                      check=False).stdout
                names.update(m.group(1) for m in re.finditer(r"^\s+(\S+)\s+\(", text, re.M))
            except (OSError, subprocess.TimeoutExpired):
                pass
    for d in [root / d for d in _LIB_DIRS] + _ld_so_conf_dirs(root):
        try:
            names.update(p.name for p in d.iterdir() if ".so" in p.name)
        except OSError:
            continue
    return names


def _library_packages() -> dict[str, dict[str, str]]:
    try:
        return json.loads(LIBRARY_PACKAGES.read_text())["libraries"]
    except (OSError, ValueError, KeyError):
        return {}


# A missing library is fatal unless every file needing it is a known optional part: stdlib extras a server
# never uses (Tk, NIS, curses, readline, dbm), Intel OpenMP offload/SYCL plugins that ship with intel-openmp
# and are loaded only on request, numba's alternative thread pools. Anything else (vLLM's and torch's
# compiled code, the interpreter, stdlib modules such as _sqlite3 that vLLM imports) is required.
_OPTIONAL_NEEDERS = ("/lib-dynload/_tkinter", "/lib-dynload/nis.", "/lib-dynload/readline.", "/lib-dynload/_curses",
                     "/lib-dynload/_dbm", "/lib-dynload/_gdbm", "lib/libomptarget", "lib/libur_", "lib/libpi_",
                     "lib/libarcher", "lib/libsycl", "/numba/np/ufunc/omppool", "/numba/np/ufunc/tbbpool")


def _core_needers(env: EnvironmentRecord, lib: str) -> list[str]:
    needers = env.needed_by.get(lib)
    if not needers:  # bundles without needed_by: treat every library as required
        return ["(unknown)"]
    return [f for f in needers if not any(o in f"/{f}" for o in _OPTIONAL_NEEDERS)]


def check_libraries(ctx: _Context) -> list[CheckResult]:
    envs = [e for e in ctx.envs.values()]
    if not envs:
        return []
    provided = system_libraries(ctx.root)
    packages = _library_packages()
    out = []
    for env in envs:
        name = env.name
        needed = list(env.needed_libraries)
        missing = [lib for lib in needed if lib not in provided]
        if not missing:
            out.append(CheckResult("libraries", PASS, f"all {len(needed)} needed system libraries found"
                                   + (f" ({', '.join(needed)})" if needed else ""), subject=name))
            continue
        optional = [lib for lib in missing if not _core_needers(env, lib)]
        if optional:
            out.append(CheckResult(
                "libraries", WARN,
                "optional parts will not load, missing: " + "; ".join(
                    f"{lib} (needed by {', '.join(env.needed_by.get(lib, ())[:2])})"
                    for lib in optional),
                "ignore unless you use those parts; otherwise install the libraries", name))
            missing = [lib for lib in missing if lib not in optional]
            if not missing:
                continue
        described, debian, rhel = [], [], []
        for lib in missing:
            pkg = packages.get(lib)
            if pkg:
                described.append(f"{lib} (Debian/Ubuntu: {pkg['debian']}, RHEL: {pkg['rhel']})")
                debian.append(pkg["debian"].split()[0])
                rhel.append(pkg["rhel"].split()[0])
            else:
                described.append(f"{lib} (package unknown: `apt-file search {lib}` / `dnf provides '*/{lib}'`)")
        remedy = "install the package(s) from the distribution's offline media"
        if debian:
            remedy += (f": `apt-get install {' '.join(dict.fromkeys(debian))}` or "
                       f"`dnf install {' '.join(dict.fromkeys(rhel))}`")
        out.append(CheckResult("libraries", FAIL, f"missing on this server: {'; '.join(described)}", remedy,
                               name))
    return out
