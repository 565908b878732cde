"""The carried C compiler on a server without one: a booted, network-less systemd-nspawn container (Debian
minbase: no gcc, no binutils, no libc headers), bundles from `pack build` installed by their own install.sh.

A CUDA-shaped environment (the test channel, ``cuda: "12.8"``) built with ``compiler: false`` cannot start a
GPU vLLM there: its preflight's ``compiler`` row FAILs with the remedy. Built with the default, the row
PASSes (it cannot run before the unpack), the installer test-compiles with the carried compiler right after
conda-unpack, the instance's env file names it as ``CC``, and the service user builds a Python extension with
it against the environment's ``Python.h`` that the environment's python imports. The container has no GPU:
the GPU checks are skipped with --skip-check, as a GPU-less staging run would.
"""
# ruff: noqa: F811

from __future__ import annotations

import re

import pytest

from devkit.nspawn import Container
from tests.compiler_fixtures import COMPILER, EXT_C, IMPORT_EXT, PYVER, build_bundle
from tests.conda.fixtures import conda_channel, wheel_dir  # noqa: F401
from tests.nspawn import fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
nspawn_rootfs = fixtures.nspawn_rootfs
GPU_SKIPS = "driver,gpus,gpu-memory,compute-capability"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, conda_channel, wheel_dir):
    work = tmp_path_factory.mktemp("cc-nspawn")
    with_cc = build_bundle(work / "cc", "gpucc", conda_channel, wheel_dir, compiler=None)
    without = build_bundle(work / "nocc", "gpunocc", conda_channel, wheel_dir, compiler=False)
    assert with_cc.env["compiler"] == COMPILER
    assert "compiler" not in without.env
    assert "gcc_linux-64" not in {p["name"] for p in without.env["lock"]["conda"]}
    return {"cc": with_cc, "nocc": without}


@pytest.fixture(scope="module")
def target(nspawn_rootfs, bundles):
    binds = []
    for key, b in bundles.items():
        binds += [(b.bundle.parent, f"/media/{key}", True), (b.pub.parent, f"/keys/{key}", True)]
    with Container(nspawn_rootfs, binds=binds, name="llm-compiler-test",
                   nspawn_args=["--tmpfs=/tmp:mode=1777,size=2G"]) as c:
        for tool in ("gcc", "cc", "ld", "as", "clang"):
            assert c.run(["sh", "-c", f"command -v {tool}"], check=False).returncode != 0, f"{tool} on the target"
        assert c.run(["test", "-e", "/usr/include/stdio.h"], check=False).returncode != 0
        yield c


def install_sh(c: Container, bundles: dict, key: str, *args: str):
    b = bundles[key]
    return c.run(["bash", f"/media/{key}/{b.bundle.name}/install.sh", "--pubkey", f"/keys/{key}/{b.pub.name}",
                  "--skip-check", GPU_SKIPS, *args], timeout=600, check=False)


def compiler_row(out: str) -> tuple[str, str, str, str]:
    """(status, subject, detail, remedy) of the preflight table's compiler row."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(PASS|WARN|FAIL|SKIP)\s+compiler\s+(\S+)\s+(.*)$", line)
        if m:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            remedy = nxt.removeprefix("remedy:").strip() if nxt.startswith("remedy:") else ""
            return m.group(1), m.group(2), m.group(3), remedy
    raise AssertionError(f"no compiler row in:\n{out}")


def test_without_a_compiler_the_compiler_row_fails_with_the_remedy(target, bundles):
    r = install_sh(target, bundles, "nocc", "--check")
    out = r.stdout + r.stderr
    print(out)
    assert r.returncode == 1, out
    status, subject, detail, remedy = compiler_row(out)
    assert status == "FAIL" and subject == "gpunocc" and "no C compiler for gpunocc" in detail
    assert "no cc/gcc/clang in" in detail and "Triton" in detail
    assert "apt-get install gcc" in remedy and "environments[].compiler: true" in remedy
    r = install_sh(target, bundles, "nocc")
    assert r.returncode == 1 and "preflight failed: nothing was changed" in r.stderr, r.stdout + r.stderr
    assert target.run(["test", "-e", "/opt/llm/envs"], check=False).returncode != 0


def test_with_its_compiler_the_env_builds_a_python_extension_on_the_target(target, bundles):
    b = bundles["cc"]
    cc = f"{b.env_dir}/{COMPILER}"
    r = install_sh(target, bundles, "cc", "--check")
    out = r.stdout + r.stderr
    print(out)
    assert r.returncode == 0, out
    assert compiler_row(out)[:3] == ("PASS", "gpucc", f"{cc} (the environment's own: it runs once the environment is "
                                             "unpacked)")

    r = install_sh(target, bundles, "cc")
    out = r.stdout + r.stderr
    print(out[-4000:])
    assert r.returncode == 0, out
    assert f"environment gpu: its C compiler {COMPILER} builds a shared object against its Python.h" in r.stdout

    from installer.service import parse_env_file

    env = parse_env_file(target.run(["cat", "/etc/llm/gpucc.env"]).stdout)
    assert env["CC"] == cc and env["PATH"].startswith(f"{b.env_dir}/bin:")

    # as Triton does at a GPU start, as the service user, with the service's PATH
    target.write_file("/tmp/cc-test/llmcc.c", EXT_C)
    target.run("chown -R llm /tmp/cc-test")
    build = (f"cd /tmp/cc-test && {cc} -shared -fPIC -O1 -I {b.env_dir}/include/python{PYVER} llmcc.c -o llmcc.so"
             f" && {b.env_dir}/bin/python -c \"{IMPORT_EXT}\"")
    r = target.run(["runuser", "-u", "llm", "--", "env", "-i", f"PATH={env['PATH']}", "HOME=/tmp/cc-test",
                    "sh", "-c", build], timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "answer 42"
