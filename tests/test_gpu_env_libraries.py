"""The library and driver checks on a REAL CUDA environment's needs (vLLM 0.24.0, CUDA 13.0, 93k files, built
as docs/gpu.md says): its full needed_by map is a fixture, the servers are a bare Debian-like root, the real
H200's `ldconfig -p`, and the H200's nvidia-smi captures with the driver set to a 570.x release."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from installer import preflight as pf
from tests.test_preflight import h200

GPU = Path(__file__).parent / "fixtures" / "gpu"
REAL = json.loads((GPU / "vllm-0.24.0-cu130-libraries.json").read_text())
BASE = ["libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libgcc_s.so.1", "libstdc++.so.6",
        "libz.so.1"]  # any server: glibc, the C++ runtime, zlib


def manifest() -> dict:
    e = REAL["environment"]
    env = {"name": e["name"], "artifact": f"envs/{e['name']}.tar.zst", "content_hash": "a" * 64,
           "python": e["python"], "platform": "linux-64", "cuda": e["cuda"], "cuda_runtime": e["cuda_runtime"],
           "min_driver": e["min_driver"], "driver_floor": e["min_driver"], "glibc": e["glibc_floor"],
           "needed_libraries": REAL["needed_libraries"], "needed_by": REAL["needed_by"]}
    m = json.loads((Path(__file__).parent / "fixtures" / "preflight" / "accept.json").read_text())
    m["environments"] = [env]
    m["services"] = [dict(m["services"][0], environment=e["name"])]
    return m


def server(root: Path, sonames: list[str]) -> Path:
    d = root / "usr/lib/x86_64-linux-gnu"
    d.mkdir(parents=True)
    for s in sonames:
        (d / s).write_bytes(b"")
    return root


def libraries(root: Path) -> list[pf.CheckResult]:
    res = pf.run_preflight(manifest(), root=root, gpu_info=h200(), skip=[c for c in pf.CHECKS if c != "libraries"])
    return [r for r in res if r.name == "libraries"]


def test_a_bare_server_only_warns_about_plugins(tmp_path):
    """No libcuda (the driver check's), no RDMA/UCX/MPI/libfabric (only NVSHMEM transports and bootstraps and
    cuFile's RDMA plugin need them): nothing fails; the WARN names each plugin."""
    rows = libraries(server(tmp_path, BASE))
    assert [r.status for r in rows] == [pf.WARN], rows
    warn = rows[0].detail
    for lib in ("libfabric.so.1", "libibverbs.so.1", "libmlx5.so.1", "libmpi.so.40", "liboshmem.so.40",
                "libpmix.so.2", "librdmacm.so.1", "libucp.so.0", "libucs.so.0", "libtbb.so.12"):
        assert lib in warn, lib
    assert "nvshmem_transport_" in warn and "libcufile_rdma" in warn
    assert "libcuda.so.1" not in warn  # the NVIDIA driver's: judged by the driver check


def test_the_h200s_libraries_satisfy_the_real_env(tmp_path):
    text = (GPU / "ldconfig-p.txt").read_text()
    sonames = sorted(set(re.findall(r"^\s+(\S+)\s+\(", text, re.M)))
    assert "libcuda.so.1" in sonames and len(sonames) > 300
    rows = libraries(server(tmp_path, sonames))
    assert pf.FAIL not in [r.status for r in rows], rows


def test_a_core_library_missing_still_fails_with_its_package(tmp_path):
    rows = libraries(server(tmp_path, [s for s in BASE if s != "libstdc++.so.6"]))
    fail = [r for r in rows if r.status == pf.FAIL]
    assert len(fail) == 1 and "libstdc++.so.6 (Debian/Ubuntu: libstdc++6, RHEL: libstdc++)" in fail[0].detail
    assert "apt-get install libstdc++6" in fail[0].remedy


@pytest.mark.parametrize("driver,status", [("580.159.04", pf.PASS), ("570.195.03", pf.FAIL)])
def test_the_driver_check_on_the_h200_capture_and_a_570_driver(driver, status):
    info = dataclasses.replace(h200(), driver_version=driver, cuda_version="12.8" if driver < "58" else "13.0")
    res = pf.run_preflight(manifest(), gpu_info=info, skip=[c for c in pf.CHECKS if c != "driver"])
    (r,) = [x for x in res if x.name == "driver"]
    assert r.status == status, r
    if status == pf.FAIL:
        assert "580.65.06" in r.detail and "570.195.03" in r.detail
        assert "580.65.06" in r.remedy
