"""The C compiler a CUDA environment carries (vLLM on CUDA compiles Triton's launcher at every start).

Real parts: manifests validated from YAML; `pack build` of a CUDA-shaped environment solved from the offline
test channel with ``__cuda`` = 12.8 (its ``gcc_linux-64`` is this machine's gcc, binutils and libc headers,
cut to be relocatable); the packed archive unpacked elsewhere by the installer's extractor and relocated by
its conda-unpack; the compiler building a Python extension against the environment's ``Python.h`` that the
environment's python then imports; the installer in a subprocess on a staging root.
"""
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import pytest

from installer import preflight as pf
from packager.env.compiler import compiler_specs, sysroot_version
from packager.errors import EnvironmentBuildError, ManifestError
from packager.manifest import load_manifest
from packager.spec import EnvSpec, TargetSpec
from tests.compiler_fixtures import COMPILER, build_bundle, compile_and_import, expected_sysroot
from tests.conda.fixtures import TARGET, built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    run_installer,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
)

pytestmark = pytest.mark.timeout(900)
FIX = Path(__file__).parent / "fixtures"
GPU_SKIPS = "driver,gpus,gpu-memory,compute-capability,systemd"


# --------------------------------------------------------------------------- manifest


def _envs(tmp_path: Path, envs: str, glibc: str = "2.28") -> list[EnvSpec]:
    p = tmp_path / "m.yaml"
    p.write_text(f'bundle: {{name: x, version: "1"}}\ntarget: {{glibc: "{glibc}"}}\nenvironments:\n{envs}')
    return list(load_manifest(p).environments)


def _problems(tmp_path: Path, envs: str, glibc: str = "2.28") -> list[str]:
    with pytest.raises(ManifestError) as ei:
        _envs(tmp_path, envs, glibc)
    return ei.value.problems


def test_compiler_defaults_to_cuda_and_can_be_opted_out(tmp_path):
    got = _envs(tmp_path, '  - {name: gpu, python: "3.12", cuda: "12.8"}\n'
                          '  - {name: optout, python: "3.12", cuda: "12.8", compiler: false}\n'
                          '  - {name: cpu, python: "3.12"}\n'
                          '  - {name: cpucc, python: "3.12", compiler: true}\n'
                          '  - {name: site, existing: /opt/venv, cuda: "12.8"}\n')
    assert {e.name: e.compiler for e in got} == {"gpu": True, "optout": False, "cpu": False, "cpucc": True,
                                                 "site": False}


def test_compiler_is_refused_with_existing_and_must_be_a_boolean(tmp_path):
    probs = _problems(tmp_path, "  - {name: site, existing: /opt/venv, cuda: '12.8', compiler: true}\n")
    assert any("m.yaml:4" in p and "environments[0].compiler: 'compiler' cannot be combined with 'existing'" in p
               for p in probs), probs
    probs = _problems(tmp_path, "  - {name: gpu, python: '3.12', cuda: '12.8', compiler: yes please}\n")
    assert any("environments[0].compiler: expected boolean" in p for p in probs), probs


def test_a_target_glibc_below_every_sysroot_is_refused_unless_opted_out(tmp_path):
    probs = _problems(tmp_path, "  - {name: gpu, python: '3.12', cuda: '12.8'}\n", glibc="2.12")
    assert any("environments[0]: no conda-forge sysroot for target.glibc 2.12" in p and "compiler: false" in p
               for p in probs), probs
    (env,) = _envs(tmp_path, "  - {name: gpu, python: '3.12', cuda: '12.8', compiler: false}\n", glibc="2.12")
    assert env.compiler is False


@pytest.mark.parametrize("glibc, sysroot", [("2.12", None), ("2.17", "2.17"), ("2.27", "2.17"), ("2.28", "2.28"),
                                            ("2.31", "2.28"), ("2.34", "2.34"), ("2.36", "2.34"),
                                            ("2.39", "2.39"), ("2.41", "2.39"), ("3.0", "2.39")])
def test_sysroot_is_the_newest_not_newer_than_the_target(glibc, sysroot):
    assert sysroot_version(glibc) == sysroot


def test_compiler_specs_for_the_target():
    spec = EnvSpec(name="gpu", cuda="12.8", compiler=True)
    assert compiler_specs(spec, TargetSpec(glibc="2.28"), ["python 3.12.*"]) == [
        "gcc_linux-64", "sysroot_linux-64 2.28.*"]
    assert compiler_specs(spec, TargetSpec(platform="linux-aarch64", glibc="2.34"), []) == [
        "gcc_linux-aarch64", "sysroot_linux-aarch64 2.34.*"]
    # a pin in the manifest's conda: wins; nothing is added twice
    assert compiler_specs(spec, TargetSpec(), ["gcc_linux-64 13.*", "sysroot_linux-64=2.17"]) == []
    assert compiler_specs(EnvSpec(name="cpu"), TargetSpec(), []) == []
    with pytest.raises(EnvironmentBuildError, match="no sysroot_linux-64 for target glibc 2.12"):
        compiler_specs(spec, TargetSpec(glibc="2.12"), [])


# --------------------------------------------------------------------------- pack build


@pytest.fixture(scope="module")
def cc_built(tmp_path_factory, conda_channel, wheel_dir):
    return build_bundle(tmp_path_factory.mktemp("ccbuild"), "gpucc", conda_channel, wheel_dir, compiler=None)


def test_build_adds_the_compiler_and_records_it(cc_built):
    env = cc_built.env
    assert env["compiler"] == COMPILER and env["cuda"] == "12.8"
    conda = {p["name"]: p for p in env["lock"]["conda"]}
    assert conda["sysroot_linux-64"]["version"] == expected_sysroot()
    assert conda["gcc_linux-64"]["sha256"] and conda["llmtest-kernels"]["build"] == "cu128_1"
    assert f"environment gpu: carries its C compiler {COMPILER}" in cc_built.log
    # the compiler's own libraries (isl, mpfr, bfd...) travel with it: nothing of it needs the server's
    assert not [f for files in env["needed_by"].values() for f in files if f.startswith("x86_64-conda-linux-gnu/")]


def test_a_cpu_environment_records_no_compiler(tmp_path, conda_channel):
    from packager.env.build import build_env

    p = tmp_path / "m.yaml"
    p.write_text(f'bundle: {{name: x, version: "1"}}\nenvironments:\n'
                 f'  - {{name: cpu, python: "3.11", channels: ["{conda_channel.as_uri()}"], conda: [llmtest-text]}}\n')
    (spec,) = load_manifest(p).environments
    built = build_env(spec, TARGET, tmp_path / "work", progress=False)
    assert spec.compiler is False and built.compiler is None
    assert {c["name"] for c in built.lock["conda"]} == {"python", "llmtest-text"}


def test_asking_for_a_compiler_the_environment_lacks_fails_the_build(built_env):
    """The prefix: form (an environment built by hand) with cuda: gets compiler: true by default."""
    import dataclasses

    from packager.env.build import build_env

    spec = dataclasses.replace(built_env.spec, prefix=built_env.prefix, compiler=True)
    with pytest.raises(EnvironmentBuildError) as ei:
        build_env(spec, TARGET, built_env.prefix.parent, progress=False)
    e = ei.value
    assert f"environment t1: no C compiler in {built_env.prefix}" in e.message and COMPILER in e.message
    assert "conda install -p" in e.hint and "gcc_linux-64" in e.hint and "compiler: false" in e.hint


def test_the_compiler_works_after_unpacking_elsewhere(cc_built, tmp_path):
    """Pack → the installer's extraction at another prefix → its conda-unpack → build and import an extension."""
    from installer.deploy.conda_unpack import run_conda_unpack
    from installer.unpack import extract_archive

    prefix = tmp_path / "moved" / "env"
    prefix.mkdir(parents=True)
    art = next(a for a in cc_built.manifest["artifacts"] if a["path"] == "envs/gpu.tar.zst")
    extract_archive(cc_built.bundle / art["path"], prefix, expected_sha256=art["sha256"])
    run_conda_unpack(prefix, str(prefix))
    wrapper = (prefix / COMPILER).resolve().read_text()
    # found from its own place: neither the build prefix nor (after conda-unpack) the new one is written in it
    assert str(cc_built.bundle.parent.parent) not in wrapper and str(prefix) not in wrapper
    assert compile_and_import(prefix, tmp_path / "build") == "answer 42"


# --------------------------------------------------------------------------- install (staging root)


def test_install_test_compiles_after_the_unpack_and_names_cc(cc_built, tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = run_installer("install", "--bundle", cc_built.bundle, "--root", root, "--pubkey", cc_built.pub,
                      "--skip-check", GPU_SKIPS)
    print(r.stdout)
    assert f"environment gpu: its C compiler {COMPILER} builds a shared object against its Python.h" in r.stdout
    assert f"{cc_built.env_dir}/{COMPILER} (the environment's own; not run: the root is not this server)" in r.stdout
    from installer.service import parse_env_file

    env = parse_env_file((root / "etc/llm/gpucc.env").read_text())
    assert env["CC"] == f"{cc_built.env_dir}/{COMPILER}"
    assert (root / cc_built.env_dir.lstrip("/") / COMPILER).is_file()


def test_install_refuses_a_carried_compiler_that_does_not_work(t1_parts, keys, tmp_path):
    """bin/llmtest-prefix stands for a compiler that runs but builds nothing: refused before anything moves."""
    entry = dict(t1_parts.entry, compiler="bin/llmtest-prefix")
    parts = type(t1_parts)(t1_parts.archive, t1_parts.runtime, t1_parts.python, entry)
    b = make_bundle(tmp_path / "out", BundleSpec(version="1.0.0", env=parts, models=[tiny_model()],
                                                 services=[service()]), keys)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = run_installer("install", "--bundle", b, "--root", root, "--pubkey", keys.pub, check=False)
    assert r.returncode != 0
    assert "environment t1: its C compiler /opt/llm/envs/t1/" in r.stderr and "does not work on this server" in r.stderr
    assert "bin/llmtest-prefix -shared -fPIC" in r.stderr and "--skip-check compiler" in r.stderr
    assert "nothing under /opt/llm or /etc was changed" in r.stderr
    assert not (root / "opt/llm/envs").exists() and not (root / "etc/llm").exists()
    r = run_installer("install", "--bundle", b, "--root", root, "--pubkey", keys.pub, "--skip-check", "compiler")
    assert "its C compiler" not in r.stdout and (root / "etc/llm/tiny.env").is_file()


# --------------------------------------------------------------------------- preflight (this server)


def _carried(cc: str | None = None) -> dict:
    m = json.loads((FIX / "preflight" / "accept.json").read_text())
    m["environments"][0]["compiler"] = COMPILER
    m["services"] = [dict(m["services"][0], env={"CC": cc} if cc else {})]
    return m


def test_preflight_names_the_carried_compiler_at_the_install_dir():
    from tests.test_preflight import h200

    only = [c for c in pf.CHECKS if c != "compiler"]
    (r,) = [x for x in pf.run_preflight(_carried(), gpu_info=h200(), skip=only) if x.name == "compiler"]
    assert r.status == pf.PASS
    assert r.detail == (f"/opt/llm/envs/vllm-cu128/0000000000000000/{COMPILER} (the environment's own: it runs once "
                        "the environment is unpacked)")
    # the service's own CC wins, and is really run (this host's gcc)
    (r,) = [x for x in pf.run_preflight(_carried("/usr/bin/gcc"), gpu_info=h200(), skip=only) if x.name == "compiler"]
    assert r.status == pf.PASS and r.detail == "/usr/bin/gcc (services[].env.CC) builds a shared object"
