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


def _data() -> dict:
    try:
        return json.loads(LIBRARY_PACKAGES.read_text())
    except (OSError, ValueError):
        return {}


def _library_packages() -> dict[str, dict[str, str]]:
    return _data().get("libraries") or {}


def driver_provided() -> frozenset[str]:
    """Sonames the NVIDIA driver installs (``libcuda.so.1``, ``libnvidia-ml.so.1``, ...): the driver check's."""
    return frozenset((_data().get("driver_provided") or {}).get("sonames") or ())


def optional_fragments() -> tuple[str, ...]:
    """Path fragments of files loaded only on request (plugins, stdlib extras): see library_packages.json.

    A missing library is fatal unless every file needing it is such an optional part: stdlib extras a server
    never uses (Tk, NIS, curses, readline, dbm), Intel OpenMP offload/SYCL plugins, numba's alternative
    thread pools, NVSHMEM's network transports and MPI/PMIx bootstraps, cuFile's RDMA plugin. Anything else
    (vLLM's and torch's compiled code, the interpreter, stdlib modules such as _sqlite3) is required.
    """
    return tuple((_data().get("optional_needers") or {}).get("fragments") or ())


def _core_needers(env: EnvironmentRecord, lib: str) -> list[str]:
    needers = env.needed_by.get(lib)
    if not needers:  # bundles without needed_by: treat every library as required
        return ["(unknown)"]
    optional = optional_fragments()
    return [f for f in needers if not any(o in f"/{f}" for o in optional)]


def classify(env: EnvironmentRecord, provided: set[str]) -> tuple[list[str], list[str], list[str]]:
    """(driver's, optional, missing-and-required) among the env's needed libraries this server lacks."""
    absent = [lib for lib in env.needed_libraries if lib not in provided]
    drv = driver_provided()
    driver = [lib for lib in absent if lib in drv]
    optional = [lib for lib in absent if lib not in drv and not _core_needers(env, lib)]
    required = [lib for lib in absent if lib not in drv and lib not in optional]
    return driver, optional, required


def check_libraries(ctx: _Context) -> list[CheckResult]:
    envs = [e for e in ctx.envs.values() if not e.is_existing]  # the server's own: the environment check
    if not envs:
        return []
    provided = system_libraries(ctx.root)
    packages = _library_packages()
    out = []
    for env in envs:
        name = env.name
        needed = list(env.needed_libraries)
        driver, optional, missing = classify(env, provided)
        if not optional and not missing:
            found = [lib for lib in needed if lib not in driver]
            out.append(CheckResult("libraries", PASS, f"all {len(found)} needed system libraries found"
                                   + (f" ({', '.join(found)})" if found else "")
                                   + (f"; from the NVIDIA driver (driver check): {', '.join(driver)}"
                                      if driver else ""), subject=name))
            continue
        if optional:
            out.append(CheckResult(
                "libraries", WARN,
                "optional parts will not load, missing: " + "; ".join(
                    f"{lib} (needed by {', '.join(env.needed_by.get(lib, ())[:2])})"
                    for lib in optional),
                "ignore unless you use those parts; otherwise install the libraries", name))
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
