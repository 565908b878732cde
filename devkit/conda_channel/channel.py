"""A real conda channel for the tests, built offline with py-rattler-build and indexed with py-rattler.

No conda channel is reachable from CI, so the tests build the packages they need:

- ``python``: this machine's own interpreter (``sys.base_prefix``) repackaged: bin/python3.X, libpython,
  stdlib without tests, pip. Byte-compilation is skipped (8 s instead of ~140 s).
- ``llmtest-text`` (noarch): text files that embed ``$PREFIX`` (text prefix placeholder).
- ``llmtest-bin`` (linux-64): a compiled C program printing a string that holds ``$PREFIX`` (binary prefix
  placeholder; the string is read through a ``volatile`` pointer so the compiler cannot fold its length).
- ``cuda-cudart`` 12.4 / 12.8, each depending on ``__cuda >=12.4`` / ``>=12.8``, and ``llmtest-kernels`` with
  two builds (``cu124`` and ``cu128``) so the solver has to pick the one matching the target's CUDA.
- ``llmtest-newglibc``: depends on ``__glibc >=2.99``, which no target has.
- ``gcc_linux-64``: a C compiler cut from this machine's gcc, binutils and libc headers (``copy_gcc.py``),
  self-contained (its own glibc sysroot), relocatable, ``bin/x86_64-conda-linux-gnu-cc``; it needs
  ``__glibc >=`` this machine's glibc (its binaries are this machine's).
- ``sysroot_linux-64``: an empty package with the one conda-forge sysroot version ``pack build`` asks for on a
  target with this machine's glibc (``packager.env.compiler.sysroot_version``). The sysroot the test
  compiler really uses is this machine's glibc, which matches no conda-forge sysroot version, so it lives
  inside ``gcc_linux-64`` and this package only satisfies the spec (it says so in its one file).

The channel is cached across test runs under ``$LLM_TEST_CACHE`` (default ``~/.cache/llm-pack-tests``) in a
directory named after a hash of the recipes and the interpreter, so it is rebuilt only when they change.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BUILDER_VERSION = "3"
# zstd level 3, not rattler-build's default (much higher): the 60 MB compiler package packs in ~4 s instead of
# ~30 s on two cores, for ~10% more bytes (a local test channel: size hardly matters, build time does)
PACKAGE_FORMAT = "conda:3"
HERE = Path(__file__).resolve().parent
PY_VER = f"{sys.version_info.major}.{sys.version_info.minor}"
PY_FULL = ".".join(str(x) for x in sys.version_info[:3])

HELLO_C = r"""
#include <stdio.h>
static const char prefix_buf[] = PREFIX_STR;
int main(void) {
    const char * volatile p = prefix_buf;
    printf("prefix=%s\n", p);
    return 0;
}
"""


def base_python() -> Path:
    """The machine's own interpreter (copy_python.py needs only the stdlib). Not sys.executable: a venv's
    path differs between checkouts and would make every clone build its own channel and vLLM env."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.base_prefix) / "bin" / f"python{ver}"


def _host_toolchain() -> tuple[str, str]:
    """(gcc version, glibc version) of this machine: the test compiler package is cut from them."""
    import subprocess

    gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, check=False).stdout.strip()
    return gcc or "0", os.confstr("CS_GNU_LIBC_VERSION").split()[1]


def _toolchain_packages() -> str:
    """The Debian package versions the compiler package is cut from (a security update rebuilds it)."""
    import subprocess

    gcc_major = _host_toolchain()[0].split(".")[0]
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", f"gcc-{gcc_major}", "binutils",
                        "libc6-dev", "linux-libc-dev"], capture_output=True, text=True, check=False)
    return r.stdout


def _compiler_recipes() -> dict[str, str]:
    from packager.env.compiler import sysroot_version

    gcc, glibc = _host_toolchain()
    sysroot = sysroot_version(glibc)
    return {
        "gcc_linux-64": f"""
package:
  name: gcc_linux-64
  version: "{gcc}"
build:
  number: 0
  dynamic_linking:
    binary_relocation: false
  script:
    - {base_python()} {HERE / "copy_gcc.py"} $PREFIX
requirements:
  run:
    - __glibc >={glibc}
""",
        "sysroot_linux-64": f"""
package:
  name: sysroot_linux-64
  version: "{sysroot}"
build:
  number: 0
  noarch: generic
  script:
    - mkdir -p $PREFIX/share/llmtest-sysroot && cd $PREFIX/share/llmtest-sysroot
    - echo "stand-in for sysroot_linux-64 {sysroot}, the sysroot is in gcc_linux-64 (glibc {glibc})" > README
requirements:
  run:
    - __glibc >={sysroot}
""",
    }


def _recipes() -> dict[str, str]:
    base = Path(sys.base_prefix)
    copy_py = HERE / "copy_python.py"
    recipes = {
        "python": f"""
package:
  name: python
  version: "{PY_FULL}"
build:
  number: 0
  python:
    skip_pyc_compilation:
      - "**/*.py"
  script:
    - {base_python()} {copy_py} {base} $PREFIX
about:
  license: Python-2.0
""",
        "llmtest-text": """
package:
  name: llmtest-text
  version: "1.0"
build:
  number: 0
  noarch: generic
  script:
    - mkdir -p $PREFIX/share/llmtest $PREFIX/etc/llmtest
    - echo "prefix=$PREFIX" > $PREFIX/share/llmtest/prefix.txt
    - printf '[paths]\\ndata = %s/share/llmtest\\n' "$PREFIX" > $PREFIX/etc/llmtest/config.ini
about:
  license: BSD-3-Clause
""",
        "llmtest-bin": """
package:
  name: llmtest-bin
  version: "1.0"
build:
  number: 0
  script:
    - mkdir -p $PREFIX/bin
    - /usr/bin/cc -O2 -DPREFIX_STR="\\"$PREFIX\\"" -o $PREFIX/bin/llmtest-prefix $RECIPE_DIR/hello.c
""",
        "llmtest-newglibc": """
package:
  name: llmtest-newglibc
  version: "1.0"
build:
  number: 0
  noarch: generic
  script:
    - mkdir -p $PREFIX/share/llmtest-newglibc && echo ok > $PREFIX/share/llmtest-newglibc/ok
requirements:
  run:
    - __glibc >=2.99
""",
    }
    for ver, cuda, number in (("12.4.127", "12.4", 0), ("12.8.90", "12.8", 1)):
        tag = cuda.replace(".", "")
        recipes[f"cuda-cudart-{tag}"] = f"""
package:
  name: cuda-cudart
  version: "{ver}"
build:
  number: 0
  string: cuda{tag}_0
  script:
    - mkdir -p $PREFIX/share/cuda-cudart && echo {ver} > $PREFIX/share/cuda-cudart/version.txt
requirements:
  run:
    - __cuda >={cuda}
"""
        recipes[f"llmtest-kernels-{tag}"] = f"""
package:
  name: llmtest-kernels
  version: "1.0"
build:
  number: {number}
  string: cu{tag}_{number}
  script:
    - mkdir -p $PREFIX/share/llmtest-kernels && echo cu{tag} > $PREFIX/share/llmtest-kernels/flavour.txt
requirements:
  run:
    - cuda-cudart {cuda}.*
    - __cuda >={cuda}
"""
    recipes.update(_compiler_recipes())
    return recipes


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode() + PACKAGE_FORMAT.encode())
    h.update(sys.version.encode())
    h.update(str(Path(sys.base_prefix).resolve()).encode())
    h.update((HERE / "copy_python.py").read_bytes())
    h.update((HERE / "copy_gcc.py").read_bytes() + _toolchain_packages().encode())
    h.update(HELLO_C.encode())
    for name, text in sorted(_recipes().items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("LLM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llm-pack-tests"


def build_channel(dest: Path, work: Path) -> None:
    """Build every recipe into ``dest`` (a conda channel directory: noarch/, linux-64/) and index it."""
    from rattler.index import index_fs
    from rattler_build import Stage0Recipe, ToolConfiguration

    os.environ["RATTLER_CACHE_DIR"] = str(work / "rattler-cache")
    out = work / "out"
    for name, text in _recipes().items():
        rdir = work / "recipes" / name
        rdir.mkdir(parents=True)
        (rdir / "recipe.yaml").write_text(text)
        (rdir / "hello.c").write_text(HELLO_C)
        recipe = Stage0Recipe.from_file(rdir / "recipe.yaml")
        recipe.run_build(tool_config=ToolConfiguration(), output_dir=out, channels=[], no_include_recipe=True,
                         package_format=PACKAGE_FORMAT)
    for subdir in ("noarch", "linux-64"):
        (dest / subdir).mkdir(parents=True, exist_ok=True)
        for pkg in sorted((out / subdir).glob("*.conda")):
            shutil.copyfile(pkg, dest / subdir / pkg.name)
            (dest / subdir / pkg.name).chmod(0o644)
    asyncio.run(index_fs(dest, write_zst=False, write_shards=False))


def ensure_test_channel(cache_dir: Path | None = None) -> Path:
    """Return the directory of the (cached) test channel; ``Path.as_uri()`` of it is the channel URL."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"channel-{recipe_hash()}"
    if (final / "linux-64" / "repodata.json").exists():
        return final
    with open(cache / "channel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "linux-64" / "repodata.json").exists():
            return final
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
            staging = Path(tmp) / "channel"
            build_channel(staging, Path(tmp) / "work")
            os.replace(staging, final)
        print(f"built test channel {final} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return final


if __name__ == "__main__":
    print(ensure_test_channel(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
