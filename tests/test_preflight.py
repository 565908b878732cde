"""Preflight checks: every PASS/WARN/FAIL path, with GPU facts parsed from the real device captures."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import pytest

from installer import preflight as pf
from installer.errors import BundleError, PreflightError, UsageError
from installer.preflight.nvidia import GpuInfo, parse_query_csv, parse_smi_header

FIX = Path(__file__).parent / "fixtures"
GPU_FIX = FIX / "gpu"
GIB = 1 << 30


def h200() -> GpuInfo:
    """The device's GpuInfo, from its real nvidia-smi outputs (driver 580.159.04, CUDA 13.0, cc 9.0)."""
    driver, gpus = parse_query_csv((GPU_FIX / "nvidia-smi-query.csv").read_text())
    _, cuda = parse_smi_header((GPU_FIX / "nvidia-smi.txt").read_text())
    return GpuInfo(driver_version=driver, cuda_version=cuda, gpus=tuple(gpus), source="nvidia-smi")


def with_gpus(info: GpuInfo, n: int, **changes) -> GpuInfo:
    g = info.gpus[0]
    gpus = tuple(dataclasses.replace(g, index=i, uuid=f"GPU-{i}", **changes) for i in range(n))
    return dataclasses.replace(info, gpus=gpus)


def manifest(name: str = "accept") -> dict:
    return json.loads((FIX / "preflight" / f"{name}.json").read_text())


def run(m: dict, only: str, **kw) -> list[pf.CheckResult]:
    kw.setdefault("gpu_info", h200())
    results = pf.run_preflight(m, skip=[c for c in pf.CHECKS if c != only], **kw)
    got = [r for r in results if r.name == only]
    for r in got:
        assert r.status in (pf.PASS, pf.WARN, pf.FAIL, pf.SKIP)
        if r.status in (pf.WARN, pf.FAIL):
            assert r.remedy, f"{r} has no remedy"
    return got


def one(m: dict, only: str, **kw) -> pf.CheckResult:
    (r,) = run(m, only, **kw)
    return r


ROOM = 64 * GIB  # what the fixture manifests need is 20.4 GiB at most


@pytest.fixture
def roomy(tmp_path):
    """A server root on a filesystem of its own with 64 GiB free, whatever the test host has left (CI's disk was
    at 12.8 GiB free while the other worker built its environments): a tmpfs, which costs only what is written;
    the staged model of the tests below is a sparse file."""
    root = tmp_path / "root"
    root.mkdir()
    if os.geteuid() != 0:  # CI runs as root; elsewhere the host's own free space must do
        st = os.statvfs(root)
        if st.f_bavail * st.f_frsize < ROOM:
            pytest.skip("needs root (to mount a tmpfs) or 64 GiB free under the pytest tmp dir")
        yield root
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOM}", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


# --------------------------------------------------------------------------- driver


def test_driver_pass_cuda_128_on_device_driver():
    r = one(manifest(), "driver")
    assert r.status == pf.PASS and r.subject == "vllm-cu128"
    assert "580.159.04" in r.detail and "CUDA ≤ 13.0" in r.detail and "570.26" in r.detail


def test_driver_warn_between_floor_and_minimum():
    cu131, cu140 = run(manifest("refuse-driver"), "driver")
    assert cu131.status == pf.WARN and "590.44.01" in cu131.detail and "minor-version" in cu131.detail
    assert "590.44.01" in cu131.remedy
    assert cu140.status == pf.FAIL and "CUDA 14.x" in cu140.detail


def test_driver_fail_below_floor():
    # driver known from /proc only (no CUDA version): the 12.x floor 525.60.13 decides
    old = GpuInfo(driver_version="520.61.05", source="proc")
    r = one(manifest(), "driver", gpu_info=old)
    assert r.status == pf.FAIL and "525.60.13" in r.detail and "570.26" in r.remedy
    # with the driver's CUDA version known, the major alone refuses it
    old = dataclasses.replace(h200(), driver_version="520.61.05", cuda_version="11.8")
    r = one(manifest(), "driver", gpu_info=old)
    assert r.status == pf.FAIL and "CUDA 12.x (≥ 570.26)" in r.detail and "CUDA ≤ 11.8" in r.remedy


def test_driver_floor_from_table_when_manifest_lacks_it():
    m = manifest()
    env = m["environments"][0]
    env.update(cuda="12.4", cuda_runtime="12.4")
    del env["min_driver"], env["driver_floor"]
    info = dataclasses.replace(h200(), driver_version="545.23.06", cuda_version="12.3")
    r = one(m, "driver", gpu_info=info)
    assert r.status == pf.WARN and "550.54.14" in r.detail     # installer/data/cuda_drivers.json


def test_driver_missing_fails_with_remedy():
    r = one(manifest(), "driver", gpu_info=GpuInfo(notes=("nvidia-smi: not on PATH",)))
    assert r.status == pf.FAIL and "no NVIDIA driver found" in r.detail
    assert r.remedy.startswith("install NVIDIA driver ≥ 570.26")


def cpu_manifest() -> dict:
    m = manifest()
    m["environments"][0].update(name="vllm-cpu", artifact="envs/vllm-cpu.tar.zst", cuda=None, cuda_runtime=None,
                                min_driver=None, driver_floor=None, needed_libraries=["libc.so.6"])
    m["services"][0]["environment"] = "vllm-cpu"
    return m


@pytest.mark.parametrize("check", pf.GPU_CHECKS)
def test_cpu_environment_skips_gpu_checks(check):
    for r in run(cpu_manifest(), check, gpu_info=GpuInfo()):
        assert r.status == pf.SKIP and "CPU" in r.detail


# --------------------------------------------------------------------------- gpus


def test_gpus_pass():
    r = one(manifest(), "gpus")
    assert r.status == pf.PASS and "[0]" in r.detail and "NVIDIA H200" in r.detail


def test_gpus_missing_index_and_too_few():
    results = {r.subject: r for r in run(manifest("refuse-gpus"), "gpus")}
    assert results["qwen3-32b"].status == pf.FAIL and "[1, 2] do not exist" in results["qwen3-32b"].detail
    assert results["llama-70b"].status == pf.PASS
    assert results["qwen3-8b-tp3"].status == pf.FAIL and "= 3" in results["qwen3-8b-tp3"].detail


def test_gpus_pass_on_a_four_gpu_server():
    results = run(manifest("refuse-gpus"), "gpus", gpu_info=with_gpus(h200(), 4))
    assert [r.status for r in results] == [pf.PASS, pf.PASS, pf.PASS]


def test_gpus_fewer_listed_than_tp():
    m = manifest()
    m["services"][0].update(tensor_parallel_size=2, gpus=[0])
    r = one(m, "gpus", gpu_info=with_gpus(h200(), 2))
    assert r.status == pf.FAIL and "1 GPU(s) [0] < tensor_parallel_size 2" in r.detail


def test_gpus_more_listed_than_used_warns_and_duplicates_fail():
    m = manifest()
    m["services"][0]["gpus"] = [0, 1]
    assert one(m, "gpus", gpu_info=with_gpus(h200(), 2)).status == pf.WARN
    m["services"][0].update(gpus=[1, 1], tensor_parallel_size=2)
    with pytest.raises(BundleError, match=r"services\[0\]\.gpus: a GPU index is listed twice"):
        one(m, "gpus", gpu_info=with_gpus(h200(), 2))  # refused when the MANIFEST is read


def test_gpus_none_detected():
    r = one(manifest(), "gpus", gpu_info=GpuInfo())
    assert r.status == pf.FAIL and "install NVIDIA driver ≥ 570.26" in r.remedy
    # a driver in /proc but nvidia-smi and NVML broken (e.g. after a driver upgrade without reboot)
    broken = GpuInfo(driver_version="580.159.04", source="proc",
                     notes=("nvidia-smi: Failed to initialize NVML: Driver/library version mismatch",))
    r = one(manifest(), "gpus", gpu_info=broken)
    assert r.status == pf.FAIL and "version mismatch" in r.detail


# --------------------------------------------------------------------------- tp-heads


def test_tp_heads():
    results = {r.subject: r for r in run(manifest("refuse-gpus"), "tp-heads")}
    assert results["qwen3-32b"].status == pf.PASS and "64 / tensor_parallel_size 2 = 32" in results["qwen3-32b"].detail
    bad = results["qwen3-8b-tp3"]
    assert bad.status == pf.FAIL and "not divisible by tensor_parallel_size 3" in bad.detail
    assert "[1, 2, 4, 8, 16]" in bad.remedy


def test_tp_heads_unknown_config_and_foreign_model():
    m = manifest()
    m["services"][0]["tensor_parallel_size"] = 2
    m["models"][0]["config"] = {}
    assert one(m, "tp-heads").status == pf.WARN
    m["models"][0]["config"] = {"text_config": {"num_attention_heads": 40}}   # multimodal configs nest it
    assert one(m, "tp-heads").status == pf.PASS
    m["services"][0]["model"] = "installed-earlier"
    assert one(m, "tp-heads").status == pf.SKIP


# --------------------------------------------------------------------------- gpu-memory


def test_gpu_memory_pass_shows_formula():
    r = one(manifest(), "gpu-memory")
    assert r.status == pf.PASS
    assert "weights 15.3 GiB / (tp 1 × pp 1) × 1.1 = 16.8 GiB per GPU" in r.detail
    assert "143771 MiB × 0.9 = 126.4 GiB" in r.detail


def test_gpu_memory_too_big_and_shared_gpu():
    results = run(manifest("refuse-gpus"), "gpu-memory")
    by = {r.subject: r for r in results}
    assert by["llama-70b"].status == pf.FAIL and "144.6 GiB per GPU > GPU 0" in by["llama-70b"].detail
    assert "about 2" in by["llama-70b"].remedy
    assert by["qwen3-32b"].status == pf.FAIL           # its GPUs do not exist
    assert by["GPU 0"].status == pf.FAIL and "1.80 > 1.0" in by["GPU 0"].detail


def test_gpu_memory_fits_with_tensor_parallel():
    m = manifest("refuse-gpus")
    m["services"] = [s for s in m["services"] if s["name"] == "llama-70b"]
    m["services"][0].update(gpus=[0, 1], tensor_parallel_size=2)
    r = one(m, "gpu-memory", gpu_info=with_gpus(h200(), 2))
    assert r.status == pf.PASS and "(tp 2 × pp 1)" in r.detail


def test_gpu_memory_busy_gpu_warns():
    busy = with_gpus(h200(), 1, memory_free_mib=20000)
    r = one(manifest(), "gpu-memory", gpu_info=busy)
    assert r.status == pf.WARN and "20000 MiB free" in r.detail


def test_gpu_memory_little_room_for_kv_cache_warns():
    m = manifest()
    m["models"][0]["size"] = int(126.0 * GIB / 1.1)
    r = one(m, "gpu-memory")
    assert r.status == pf.WARN and "KV cache" in r.detail


def test_gpu_memory_unknown_total_warns():
    r = one(manifest(), "gpu-memory", gpu_info=with_gpus(h200(), 1, memory_total_mib=None))
    assert r.status == pf.WARN


# --------------------------------------------------------------------------- compute capability


@pytest.mark.parametrize("cc,status", [("9.0", pf.PASS), ("7.5", pf.PASS), ("7.0", pf.FAIL), (None, pf.WARN)])
def test_compute_capability(cc, status):
    r = one(manifest(), "compute-capability", gpu_info=with_gpus(h200(), 1, compute_capability=cc))
    assert r.status == status


def test_compute_capability_env_only_bundle_checks_all_gpus():
    m = manifest()
    m["services"] = []
    r = one(m, "compute-capability", gpu_info=with_gpus(h200(), 2))
    assert r.status == pf.PASS and r.subject == "all" and "GPU 1 9.0" in r.detail


# --------------------------------------------------------------------------- host checks


def test_glibc_live():
    m = manifest()
    assert one(m, "glibc").status == pf.PASS
    m["environments"][0]["glibc"] = "99.0"
    r = one(m, "glibc")
    assert r.status == pf.FAIL and "99.0" in r.detail and "target.glibc" in r.remedy


def test_glibc_of_a_staging_root(tmp_path):
    lib = tmp_path / "lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    m = manifest()
    assert one(m, "glibc", root=tmp_path).status == pf.WARN         # no libc there
    (lib / "libc.so.6").write_bytes(b"\x7fELF...GNU C Library (Debian GLIBC 2.31-13) stable release version 2.31.\n")
    assert pf.glibc_version(tmp_path) == "2.31"
    assert one(m, "glibc", root=tmp_path).status == pf.PASS
    m["environments"][0]["glibc"] = "2.34"
    assert one(m, "glibc", root=tmp_path).status == pf.FAIL


def test_arch():
    m = manifest()
    here = platform.machine()
    assert {r.status for r in run(m, "arch")} == ({pf.PASS} if here == "x86_64" else {pf.FAIL})
    other = "linux-aarch64" if here == "x86_64" else "linux-64"
    m["target"] = {"platform": other}
    m["environments"][0]["platform"] = other
    results = run(m, "arch")
    assert [r.status for r in results] == [pf.FAIL, pf.FAIL] and "linux-" in results[0].remedy


def test_disk(roomy):
    m = manifest()
    r = one(m, "disk", root=roomy)
    assert r.status == pf.PASS and "× 1.1" in r.detail
    m["models"][0]["size"] = 1 << 60
    r = one(m, "disk", root=roomy)
    assert r.status == pf.FAIL and "free" in r.remedy


def test_disk_does_not_count_what_is_installed(roomy):
    m = manifest()
    env = m["environments"][0]
    env["unpacked_size"] = 1 << 60
    (roomy / "opt/llm/envs" / env["name"] / env["content_hash"][:16]).mkdir(parents=True)
    r = one(m, "disk", root=roomy)
    assert r.status == pf.PASS and "already installed: vllm-cu128" in r.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (CI runs as root)")
def test_disk_counts_the_staging_filesystem_when_it_is_another(roomy):
    # /var/lib/llm (where everything is verified first) on a 1 MiB tmpfs, /opt/llm elsewhere: the staged copy
    # needs room there too, and preflight says so before anything is copied
    m = manifest()
    m["models"][0]["size"] = 8 << 20
    staging_fs = roomy / "var/lib/llm"
    staging_fs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging_fs)], check=True)
    try:
        results = run(m, "disk", root=roomy, install_dir=roomy / "opt/llm")
    finally:
        subprocess.run(["umount", str(staging_fs)], check=True)
    assert [r.status for r in results] == [pf.PASS, pf.FAIL], results
    assert "staging" in results[1].detail and str(staging_fs / "staging") in results[1].remedy
    same = run(m, "disk", root=roomy, install_dir=roomy / "opt/llm")
    assert [r.status for r in same] == [pf.PASS]  # one filesystem: the rename costs no room


def _staged_by_an_earlier_run(root: Path, m: dict) -> Path:
    """What a refused run keeps in the staging tree: the environment unpacked (its marker) and the model's one
    file verified (its .llm-verified line; a sparse file of its size)."""
    env, model = m["environments"][0], m["models"][0]
    staging = root / "var/lib/llm/staging"
    ed = staging / "envs" / env["name"] / env["content_hash"][:16]
    ed.mkdir(parents=True)
    (ed / ".llm-installed.json").write_text(json.dumps({"content_hash": env["content_hash"]}))
    md = staging / "models" / model["name"] / model["commit"]
    md.mkdir(parents=True)
    f = model["files"][0]
    with open(md / f["path"], "wb") as fh:
        fh.truncate(f["size"])
    (md / ".llm-verified").write_text(f"{f['sha256']} {f['size']} {f['path']}\n")
    return staging


def test_disk_counts_only_what_is_left_to_write(roomy):
    """No scratch copy of the bundle: what is written is the environments and models, once; what an earlier run
    verified in the staging tree is not written again (one filesystem: the rename costs nothing)."""
    m = manifest()
    r = one(m, "disk", root=roomy, install_dir=roomy / "opt/llm")
    assert r.status == pf.PASS and "(environments 3.3 GiB + models 15.3 GiB) × 1.1 = 20.4 GiB" in r.detail, r.detail
    _staged_by_an_earlier_run(roomy, m)
    r = one(m, "disk", root=roomy, install_dir=roomy / "opt/llm")
    assert r.status == pf.PASS and "(environments 0.0 GiB + models 0.0 GiB) × 1.1 = 0.0 GiB" in r.detail, r.detail
    assert "verified by an earlier run: vllm-cu128, qwen3-8b 15.3 GiB" in r.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (CI runs as root)")
def test_disk_on_two_filesystems_counts_each_one_what_lands_there(roomy):
    # the staging tree (on a 1 MiB tmpfs) holds what an earlier run verified: nothing more is written there; /opt/llm
    # (another filesystem) gets every byte by a copy
    m = manifest()
    staging_fs = roomy / "var/lib/llm"
    staging_fs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging_fs)], check=True)
    try:
        _staged_by_an_earlier_run(roomy, m)
        results = run(m, "disk", root=roomy, install_dir=roomy / "opt/llm")
    finally:
        subprocess.run(["umount", str(staging_fs)], check=True)
    assert [r.status for r in results] == [pf.PASS], results
    assert "(environments 3.3 GiB + models 15.3 GiB)" in results[0].detail, results[0].detail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ports_free_taken_owned():
    m = manifest()
    port = _free_port()
    m["services"][0].update(port=port, host="127.0.0.1")
    assert one(m, "ports").status == pf.PASS
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = one(m, "ports")
        assert r.status == pf.FAIL and "in use by another program" in r.detail and f":{port}" in r.remedy
        r = one(m, "ports", owned_ports={port: "qwen3-8b"})
        assert r.status == pf.WARN and "llm@qwen3-8b" in r.detail
        r = one(m, "ports", owned_ports={port: "other"})
        assert r.status == pf.FAIL and "llm@other" in r.detail


def test_ports_duplicate_and_bad_host_and_staging(tmp_path):
    m = manifest("refuse-gpus")
    for s in m["services"]:
        s["port"] = 11500
    with pytest.raises(BundleError, match=r"services\[1\]\.port: port 11500 on 0\.0\.0\.0 is already used by "
                                          r"services\[0\]"):
        run(m, "ports")  # refused when the MANIFEST is read, before any check
    m = manifest()
    m["services"][0]["host"] = "192.0.2.1"        # TEST-NET-1: not an address of this machine
    assert one(m, "ports").status == pf.FAIL
    assert one(m, "ports", root=tmp_path).status == pf.SKIP


def test_systemd_live_and_staging(tmp_path):
    r = one(manifest(), "systemd")
    booted = Path("/run/systemd/system").is_dir()
    assert r.status == (pf.PASS if booted else pf.FAIL)
    assert one(manifest(), "systemd", root=tmp_path).status == pf.WARN
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/systemctl").write_text("")
    assert one(manifest(), "systemd", root=tmp_path).status == pf.PASS


def test_libraries_staging_root(tmp_path):
    m = manifest()
    m["environments"][0]["needed_libraries"] = ["libnuma.so.1", "libgomp.so.1", "libweird.so.9"]
    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libgomp.so.1").write_bytes(b"")
    r = one(m, "libraries", root=tmp_path)
    assert r.status == pf.FAIL
    assert "libnuma.so.1 (Debian/Ubuntu: libnuma1, RHEL: numactl-libs)" in r.detail
    assert "libgomp" not in r.detail and "libweird.so.9 (package unknown" in r.detail
    assert "apt-get install libnuma1" in r.remedy and "dnf install numactl-libs" in r.remedy
    extra = tmp_path / "opt/vendor/lib"                  # found through /etc/ld.so.conf.d
    extra.mkdir(parents=True)
    (extra / "libnuma.so.1").write_bytes(b"")
    (extra / "libweird.so.9").write_bytes(b"")
    (tmp_path / "etc/ld.so.conf.d").mkdir(parents=True)
    (tmp_path / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (tmp_path / "etc/ld.so.conf.d/vendor.conf").write_text("# vendor\n/opt/vendor/lib\n")
    assert one(m, "libraries", root=tmp_path).status == pf.PASS


def test_libraries_optional_ones_only_warn(tmp_path):
    m = manifest()
    env = m["environments"][0]
    env["needed_libraries"] = ["libnuma.so.1", "libtk8.6.so"]
    env["needed_by"] = {"libnuma.so.1": ["lib/python3.12/site-packages/vllm/_C.abi3.so"],
                        "libtk8.6.so": ["lib/python3.12/lib-dynload/_tkinter.cpython-312-x86_64-linux-gnu.so"]}
    results = [r for r in pf.run_preflight(m, root=tmp_path, skip=[c for c in pf.CHECKS if c != "libraries"])
               if r.name == "libraries"]
    by_status = {r.status: r for r in results}
    assert set(by_status) == {pf.WARN, pf.FAIL}
    assert "libtk8.6.so" in by_status[pf.WARN].detail and "_tkinter" in by_status[pf.WARN].detail
    assert "libnuma.so.1" in by_status[pf.FAIL].detail and "libtk" not in by_status[pf.FAIL].detail
    env["needed_libraries"] = ["libtk8.6.so"]
    results = pf.run_preflight(m, root=tmp_path, skip=[c for c in pf.CHECKS if c != "libraries"])
    assert not pf.failed(results)
    # stdlib modules the server's code imports are not optional (vLLM imports sqlite3 at start)
    env["needed_libraries"] = ["libsqlite3.so.0"]
    env["needed_by"] = {"libsqlite3.so.0": ["lib/python3.11/lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so"]}
    results = pf.run_preflight(m, root=tmp_path, skip=[c for c in pf.CHECKS if c != "libraries"])
    assert pf.failed(results)



def test_libraries_driver_ones_and_cuda_plugins(tmp_path):
    """libcuda.so.1 & co come with the NVIDIA driver (the driver check's); NVSHMEM transports, its MPI/PMIx
    bootstraps and cuFile's RDMA plugin are loaded on demand: WARN naming the part; a core needer still FAILs."""
    m = manifest()
    env = m["environments"][0]
    sp = "lib/python3.12/site-packages"
    env["needed_by"] = {
        "libcuda.so.1": [f"{sp}/torch/lib/libtorch_cuda.so"],
        "libnvidia-ml.so.1": [f"{sp}/nvidia/cu13/lib/libnvidia-ml-stub.so"],
        "libibverbs.so.1": [f"{sp}/nvidia/nvshmem/lib/nvshmem_transport_ibrc.so.4",
                            f"{sp}/nvidia/cu13/lib/libcufile_rdma.so.1"],
        "libmpi.so.40": [f"{sp}/nvidia/nvshmem/lib/nvshmem_bootstrap_mpi.so.4"],
        "libpmix.so.2": [f"{sp}/nvidia/nvshmem/lib/nvshmem_bootstrap_pmix.so.4"],
    }
    env["needed_libraries"] = sorted(env["needed_by"])
    results = run(m, "libraries", root=tmp_path)
    assert [r.status for r in results] == [pf.WARN], results
    warn = results[0].detail
    assert "libibverbs.so.1" in warn and "nvshmem_transport_ibrc" in warn and "libmpi.so.40" in warn
    assert "libcuda" not in warn and "libnvidia-ml" not in warn
    env["needed_libraries"] = ["libcuda.so.1", "libnvidia-ml.so.1"]
    (r,) = run(m, "libraries", root=tmp_path)
    assert r.status == pf.PASS and "from the NVIDIA driver (driver check): libcuda.so.1, libnvidia-ml.so.1" in r.detail
    # the same library needed by vLLM's own code is required
    env["needed_libraries"] = ["libibverbs.so.1"]
    env["needed_by"]["libibverbs.so.1"].append(f"{sp}/vllm/_C.abi3.so")
    statuses = {r.status for r in run(m, "libraries", root=tmp_path)}
    assert statuses == {pf.FAIL}


def test_libraries_live_ld_cache():
    m = cpu_manifest()
    assert one(m, "libraries").status == pf.PASS       # libc.so.6 via ldconfig -p
    m["environments"][0]["needed_libraries"] = ["libnot-on-any-server.so.1"]
    assert one(m, "libraries").status == pf.FAIL


# --------------------------------------------------------------------------- skip, rendering, real runs


def test_skip_check():
    results = pf.run_preflight(manifest(), skip=["systemd,ports", "libraries"], gpu_info=h200())
    skipped = [r for r in results if r.status == pf.SKIP]
    assert [r.name for r in skipped] == ["ports", "systemd", "libraries"]
    assert all("--skip-check" in r.detail for r in skipped)
    with pytest.raises(UsageError, match="did you mean 'systemd'"):
        pf.run_preflight(manifest(), skip=["sytemd"], gpu_info=h200())


def test_skipping_all_gpu_checks_does_not_detect():
    # disk has its own tests above (on a root with known room): here it would depend on what the test host has free
    results = pf.run_preflight(manifest(), skip=list(pf.GPU_CHECKS) + ["systemd", "libraries", "disk"])
    assert not pf.failed(results)


def test_render_table_and_json():
    results = pf.run_preflight(manifest("refuse-gpus"), gpu_info=h200(), skip=["systemd", "libraries", "disk"])
    table = pf.render_table(results)
    lines = table.splitlines()
    header = lines[0]
    col = header.index("DETAIL")
    rows = [ln for ln in lines[1:-1] if not ln.lstrip().startswith("remedy:")]
    assert len(rows) == len(results)
    for ln, r in zip(rows, results, strict=True):
        assert ln.startswith(r.status) and ln[col:] == r.detail
    remedies = [ln for ln in lines if ln.lstrip().startswith("remedy:")]
    assert len(remedies) == sum(1 for r in results if r.status != pf.PASS and r.remedy)
    assert all(ln.index("remedy:") == col for ln in remedies)
    assert lines[-1].startswith("preflight: ") and "FAIL: install refused" in lines[-1]
    data = json.loads(pf.results_to_json(results))
    assert data["ok"] is False and data["summary"] == pf.summary(results)
    assert data["checks"][0] == results[0].to_dict()
    with pytest.raises(PreflightError, match="gpus \\(qwen3-32b\\)"):
        pf.raise_on_failure(results)


def test_device_verdicts_reproduce_from_fixtures():
    """The GPU rows the real H200 printed are what the fixtures give here (same code, same facts)."""
    for name in ("accept", "refuse-driver", "refuse-gpus"):
        recorded = json.loads((FIX / "preflight/device-run" / f"preflight-{name}.json").read_text())["checks"]
        ours = [r.to_dict() for r in pf.run_preflight(manifest(name), gpu_info=h200(),
                                                      skip=["glibc", "disk", "ports", "api-keys", "systemd",
                                                            "libraries", "environment", "compiler"])]
        gpu_rows = [c for c in recorded if c["name"] in pf.GPU_CHECKS + ("tp-heads", "arch")]
        assert gpu_rows == [c for c in ours if c["status"] != pf.SKIP]


def test_real_run_on_this_gpu_less_machine():
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver")
    results = pf.run_preflight(manifest())                 # real detection, real host
    by = {r.name: r for r in results}
    for check in pf.GPU_CHECKS:
        assert by[check].status == pf.FAIL, by[check]
        assert "install NVIDIA driver ≥ 570.26" in by[check].remedy
    assert by["tp-heads"].status == pf.PASS and by["glibc"].status == pf.PASS
    cpu = {r.name: r for r in pf.run_preflight(cpu_manifest())}
    for check in pf.GPU_CHECKS:
        assert cpu[check].status == pf.SKIP
    assert cpu["libraries"].status == pf.PASS


def test_cli(tmp_path, capsys):
    m = FIX / "preflight/accept.json"
    gpu_json = GPU_FIX / "detect.json"
    rc = pf.main([str(m), "--gpu-info", str(gpu_json), "--skip-check", "systemd,libraries,disk"])
    out = capsys.readouterr().out
    assert rc == 0 and "driver 580.159.04 (supports CUDA ≤ 13.0) ≥ 570.26" in out
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = copy.deepcopy(manifest())
    data["environments"][0]["glibc"] = "99.0"
    (bundle / "MANIFEST.json").write_text(json.dumps(data))
    rc = pf.main([str(bundle), "--json", "--gpu-info", str(gpu_json), "--skip-check", "systemd"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["ok"] is False
    assert pf.main([str(m), "--skip-check", "nope"]) == 2


# --------------------------------------------------------------------------- api-keys


def _root_with_systemd(tmp_path: Path, version: int) -> Path:
    lib = tmp_path / "usr/lib/x86_64-linux-gnu/systemd" / f"libsystemd-shared-{version}.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    return tmp_path


def test_api_keys_open_listener_warns_loopback_passes():
    m = manifest()
    m["services"][0].update(host="0.0.0.0", api_key_file=None)
    r = one(m, "api-keys")
    assert r.status == pf.WARN and "listens on 0.0.0.0:11434 without api_key_file" in r.detail
    m["services"][0]["host"] = "127.0.0.1"
    assert one(m, "api-keys").status == pf.PASS


def test_api_keys_missing_key_fails_live_and_warns_in_staging(tmp_path):
    m = manifest()
    m["services"][0]["api_key_file"] = f"{tmp_path}/nope/k.key"
    r = one(m, "api-keys")
    assert r.status == pf.FAIL and f"API key file {tmp_path}/nope/k.key does not exist" in r.detail
    assert "then run the install again" in r.remedy
    staged = one({**m, "services": [{**m["services"][0], "api_key_file": "/etc/llm/keys/k.key"}]}, "api-keys",
                 root=_root_with_systemd(tmp_path / "stage", 252))
    assert staged.status == pf.WARN
    assert "install -D -m 0600 -o root -g root KEYFILE /etc/llm/keys/k.key" in staged.remedy


def test_api_keys_root_only_key_passes_with_credentials(tmp_path):
    root = _root_with_systemd(tmp_path, 252)
    key = root / "etc/llm/keys/k.key"
    key.parent.mkdir(parents=True)
    key.write_text("sk-1\n")
    key.chmod(0o600)
    m = manifest()
    m["services"][0]["api_key_file"] = "/etc/llm/keys/k.key"
    r = one(m, "api-keys", root=root)
    assert r.status == pf.PASS and "systemd reads it as root (LoadCredential=)" in r.detail


def test_preflight_cli_refuses_a_bad_manifest_without_traceback(tmp_path, capsys):
    data = manifest()
    data["environments"][0]["cuda"] = "12.8\n"
    (tmp_path / "MANIFEST.json").write_text(json.dumps(data))
    assert pf.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/MANIFEST.json: environments[0].cuda: '12.8\\n' contains a line break")


# --------------------------------------------------------------------------- the driver table (data)


@pytest.mark.parametrize("cuda,driver", [("13.0", "580.65.06"), ("13.1", "590.44.01"), ("13.2", "595.45.04"),
                                         ("13.3", "610.43.02"), ("12.8", "570.26")])
def test_driver_table_rows(cuda, driver):
    from installer.preflight import cuda as table

    assert table.min_driver(cuda) == driver
    assert table.driver_supports(driver, cuda)
    assert not table.driver_supports(str(int(driver.split(".")[0]) - 1), cuda)  # one branch older


def test_driver_table_newest_cuda_and_floors():
    from installer.preflight import cuda as table

    assert table.newest_cuda_for_driver("580.159.04") == "13.0"   # the H200's driver
    assert table.newest_cuda_for_driver("595.58.03") == "13.2"
    assert table.newest_cuda_for_driver("610.43.02") == "13.3"
    assert table.driver_floor("13.2") == "580.65.06" and table.driver_floor("12.4") == "525.60.13"
    assert table.table()["updates"]["13.1 Update 1"] == "590.48.01"
    with pytest.raises(UsageError, match="13.9 is not in the driver table"):
        table.min_driver("13.9")
