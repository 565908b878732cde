"""Copy this machine's Python into a conda build prefix (run by the `python` test recipe's build script).

Usage: copy_python.py BASE_PREFIX PREFIX

Copies bin/python3.X, libpython, the headers, the stdlib without its test suites, bytecode caches and the
static library, and pip from the base installation's site-packages. The build prefix ($PREFIX) is written
into `_sysconfigdata*.py` and the `config-*/Makefile` so rattler-build records them as text files with a
prefix placeholder, like a real conda python package.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}
SKIP_SUFFIXES = (".a", ".o", ".pyc")


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names
            if (n in SKIP_DIRS and os.path.isdir(os.path.join(directory, n))) or n.endswith(SKIP_SUFFIXES)}


GLIBC = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "libutil.so", "libresolv.so",
         "ld-linux")
OPTIONAL_MODULES = ("_tkinter", "nis")  # X11/Tk and NIS: a server's Python does without them


def bundle_shared_libraries(dynload: Path, libdir: Path) -> None:
    """Ship the system libraries the stdlib's extension modules link (sqlite3, ssl, ffi, lzma...).

    A conda-forge `python` gets them from its dependencies (sqlite, openssl, libffi...); this test package
    is cut from the build machine's interpreter, so it carries copies instead. Without this the env would
    need e.g. libsqlite3.so.0 from the server, and vLLM imports sqlite3 at start.
    """
    import subprocess

    for mod in sorted(dynload.glob("*.so")):
        if mod.name.startswith(OPTIONAL_MODULES):
            continue
        out = subprocess.run(["ldd", str(mod)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
                soname, path = parts[0], Path(parts[2])
                if soname.startswith(GLIBC) or (libdir / soname).exists():
                    continue
                shutil.copy2(path, libdir / soname)  # follows the symlink: a real file named by soname


def main(base: Path, prefix: Path) -> None:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    (prefix / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "bin" / f"python{ver}", prefix / "bin" / f"python{ver}")
    for link in ("python3", "python"):
        os.symlink(f"python{ver}", prefix / "bin" / link)
    for lib in sorted((base / "lib").glob("libpython*.so*")):
        shutil.copy2(lib, prefix / "lib" / lib.name, follow_symlinks=False)
    if (base / "include" / f"python{ver}").is_dir():
        shutil.copytree(base / "include" / f"python{ver}", prefix / "include" / f"python{ver}", symlinks=True)
    stdlib = prefix / "lib" / f"python{ver}"
    shutil.copytree(base / "lib" / f"python{ver}", stdlib, symlinks=True, ignore=_ignore)
    site = stdlib / "site-packages"
    site.mkdir()
    base_site = base / "lib" / f"python{ver}" / "site-packages"
    for entry in sorted(base_site.iterdir()):
        if entry.name == "pip" or (entry.name.startswith("pip-") and entry.name.endswith(".dist-info")):
            shutil.copytree(entry, site / entry.name, symlinks=True, ignore=_ignore)
    # pip's entry point scripts, as pip would write them (absolute shebang into the prefix)
    for name in ("pip", f"pip{sys.version_info.major}", f"pip{ver}"):
        script = prefix / "bin" / name
        script.write_text(f"#!{prefix}/bin/python{ver}\nimport sys\nfrom pip._internal.cli.main import main\n"
                          "if __name__ == '__main__':\n    sys.exit(main())\n")
        script.chmod(0o755)
    bundle_shared_libraries(stdlib / "lib-dynload", prefix / "lib")
    old = str(base).encode()
    targets = list(stdlib.glob("_sysconfigdata*.py")) + list(stdlib.glob("config-*/Makefile"))
    for path in targets:
        path.write_bytes(path.read_bytes().replace(old, str(prefix).encode()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
