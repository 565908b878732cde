"""Cut a relocatable C compiler out of this machine's gcc, binutils and libc headers into a conda build prefix
(run by the ``gcc_linux-64`` test recipe's build script).

Usage: copy_gcc.py PREFIX

What a GPU start of vLLM needs is a compiler that builds a shared object against the environment's
``Python.h`` (Triton's launcher stub) on a server that has no gcc, no binutils and no libc headers. The
build machine is Debian bookworm (gcc-12, binutils, libc6-dev, linux-libc-dev); what it has is copied:

``bin/x86_64-conda-linux-gnu-gcc`` (and ``-cc``, a link to it)
    a shell wrapper running ``TOOL/bin/gcc --sysroot=TOOL/sysroot``; ``TOOL`` is found from the wrapper's own
    location (``readlink -f``), so nothing names the build prefix and the environment can move anywhere
``TOOL = x86_64-conda-linux-gnu/`` (where conda-forge's compilers keep their sysroot)
    ``bin/gcc``: the driver. It finds ``lib/gcc/<triplet>/<version>/`` relative to itself, and there ``cc1``,
    ``collect2`` and also ``as`` and ``ld`` (the driver and collect2 search that directory for them before
    PATH), the crt*.o objects, libgcc and gcc's own headers. ``lib/``: the shared libraries cc1, as and ld
    need beyond glibc (isl, mpc, mpfr, gmp, bfd, ctf, sframe, jansson, zlib, zstd), found through RUNPATHs
    relative to ``$ORIGIN``. ``sysroot/``: the libc6-dev and linux-libc-dev headers, the crt files and linker
    scripts of libc6-dev (absolute paths inside them are taken under the sysroot by ld), and the glibc and
    libgcc_s shared objects they name.

Left out: C++ (cc1plus, libstdc++), LTO (lto1), sanitizers, OpenMP, static libc, gold, docs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOL = "x86_64-conda-linux-gnu"
WRAPPER = f"bin/{TOOL}-gcc"
GCC_PROGRAMS = ("cc1", "collect2", "lto-wrapper")
GCC_FILES = ("crtbegin.o", "crtbeginS.o", "crtbeginT.o", "crtend.o", "crtendS.o", "libgcc.a", "libgcc_eh.a",
             "libgcc_s.so", "liblto_plugin.so")
LIBC_DEV = ("libc6-dev", "linux-libc-dev")
# libc6-dev's files kept under sysroot/usr/lib/<triplet>: start files and what `-lc -lm` link (no static libc)
LIBC_LINK = ("crt1.o", "crti.o", "crtn.o", "Scrt1.o", "rcrt1.o", "libc.so", "libm.so", "libc_nonshared.a",
             "libmvec.so", "libpthread.a", "libdl.a", "librt.a", "libutil.a")
# the shared objects those name (sysroot/lib/<triplet>): link-time inputs only, never loaded from there
LIBC_SHARED = ("libc.so.6", "libm.so.6", "libmvec.so.1", "ld-linux-x86-64.so.2", "libgcc_s.so.1")
GLIBC_PREFIXES = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux", "linux-vdso")

SCRIPT = """#!/bin/sh
# The environment's C compiler: gcc {gcc} and binutils {binutils} cut from {distro}, glibc {glibc} sysroot.
# Everything is found from this script's own location: the environment can be unpacked anywhere.
self=$0
command -v readlink >/dev/null 2>&1 && self=$(readlink -f -- "$0")
tool=$(cd -P -- "${{self%/*}}/.." && pwd -P)/{tool} || exit 1
exec "$tool/bin/gcc" --sysroot="$tool/sysroot" "$@"
"""


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def _shared_deps(path: Path) -> dict[str, Path]:
    """soname -> file of each non-glibc library ``path`` loads (ldd: the whole closure)."""
    deps = {}
    for line in _out("ldd", str(path)).splitlines():
        parts = line.split()
        if (len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/")
                and not parts[0].startswith(GLIBC_PREFIXES)):
            deps[parts[0]] = Path(parts[2]).resolve()
    return deps


def _runpath(path: Path, libdir: Path) -> None:
    rel = os.path.relpath(libdir, path.parent)
    subprocess.run(["patchelf", "--set-rpath", "$ORIGIN" if rel == "." else f"$ORIGIN/{rel}", str(path)],
                   check=True)


def _package_files(packages: tuple[str, ...]) -> list[Path]:
    try:
        listed = _out("dpkg", "-L", *packages)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"copy_gcc.py: needs a Debian build host with {' '.join(packages)} installed: {e}")
    return [Path(p) for p in listed.splitlines() if p.startswith("/")]


def _copy_sysroot(sysroot: Path, triplet: str) -> None:
    inc = sysroot / "usr" / "include"
    for src in _package_files(LIBC_DEV):
        if src.is_relative_to("/usr/include") and (src.is_file() or src.is_symlink()) and not src.is_dir():
            dest = inc / src.relative_to("/usr/include")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest, follow_symlinks=not src.is_symlink() or os.readlink(src).startswith("/"))
    usrlib = sysroot / "usr" / "lib" / triplet
    lib = sysroot / "lib" / triplet
    usrlib.mkdir(parents=True)
    lib.mkdir(parents=True)
    for name in LIBC_LINK:
        src = Path("/usr/lib") / triplet / name
        if src.is_symlink():  # libmvec.so -> /lib/<triplet>/libmvec.so.1: point inside the sysroot instead
            target = Path(os.readlink(src))
            os.symlink(os.path.relpath(sysroot / target.relative_to("/"), usrlib), usrlib / name)
        elif src.exists():
            shutil.copy2(src, usrlib / name)
    for name in LIBC_SHARED:
        shutil.copy2(Path("/lib") / triplet / name, lib / name)  # follows the symlink: a real file
    (sysroot / "lib64").mkdir()
    os.symlink(f"../lib/{triplet}/ld-linux-x86-64.so.2", sysroot / "lib64" / "ld-linux-x86-64.so.2")


def main(prefix: Path) -> None:
    gcc = Path(shutil.which("gcc") or sys.exit("copy_gcc.py: no gcc on PATH")).resolve()
    version, triplet = _out(str(gcc), "-dumpversion"), _out(str(gcc), "-dumpmachine")
    gcc_dir = Path(_out(str(gcc), "-print-libgcc-file-name")).resolve().parent
    tool = prefix / TOOL
    libexec = tool / "lib" / "gcc" / triplet / version
    libdir = tool / "lib"
    libexec.mkdir(parents=True)
    (tool / "bin").mkdir()
    programs = [tool / "bin" / "gcc"]
    shutil.copy2(gcc, programs[0])
    for name in GCC_PROGRAMS:
        shutil.copy2(gcc_dir / name, libexec / name)
        programs.append(libexec / name)
    for name, tools in (("as", ("x86_64-linux-gnu-as", "as")), ("ld", ("x86_64-linux-gnu-ld.bfd", "ld.bfd"))):
        found = next((shutil.which(t) for t in tools if shutil.which(t)), None) or sys.exit(f"copy_gcc.py: no {name}")
        shutil.copy2(Path(found).resolve(), libexec / name)
        programs.append(libexec / name)
    for name in GCC_FILES:
        shutil.copy2(gcc_dir / name, libexec / name)
    shutil.copytree(gcc_dir / "include", libexec / "include", symlinks=True)
    libs: dict[str, Path] = {}
    for p in programs:
        libs.update(_shared_deps(p))
    for soname, src in sorted(libs.items()):
        shutil.copy2(src, libdir / soname)
        _runpath(libdir / soname, libdir)
    for p in programs:
        if _shared_deps(p):
            _runpath(p, libdir)
    _copy_sysroot(tool / "sysroot", triplet)
    glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    binutils = _out(str(libexec / "ld"), "--version").splitlines()[0].split()[-1]
    distro = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                   if line.startswith("PRETTY_NAME=")), "this machine")
    wrapper = prefix / WRAPPER
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(SCRIPT.format(gcc=_out(str(gcc), "-dumpfullversion"), binutils=binutils, distro=distro,
                                     glibc=glibc, tool=TOOL))
    wrapper.chmod(0o755)
    os.symlink(wrapper.name, prefix / "bin" / f"{TOOL}-cc")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
