"""Running the preflight checks against a root (``/`` = this server; another dir = a staging tree)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from installer.bundle.manifest import Manifest
from installer.preflight.cluster import check_cluster
from installer.preflight.context import (
    CHECKS,
    GPU_CHECKS,
    INSTALL_DIR,
    SKIP,
    CheckResult,
    _Context,
    parse_skip,
)
from installer.preflight.gpu import check_compute_capability, check_driver, check_gpu_memory, check_gpus, check_tp_heads
from installer.preflight.host import check_api_keys, check_arch, check_disk, check_glibc, check_ports, check_systemd
from installer.preflight.libraries import check_libraries
from installer.preflight.nvidia import GpuInfo, detect_gpus
from installer.preflight.toolchain import check_compiler, check_environment


def run_preflight(manifest: Manifest | Mapping, *, root: Path = Path("/"), skip: Iterable[str] = frozenset(),
                  gpu_info: GpuInfo | None = None, owned_ports: Mapping[int, str] | None = None,
                  install_dir: Path | None = None) -> list[CheckResult]:
    """Run every check against ``root`` (``/`` = this server; another dir = a staging tree).

    ``manifest`` is the bundle's :class:`~installer.bundle.manifest.Manifest`, or a MANIFEST dict (validated here).

    ``gpu_info`` defaults to :func:`installer.preflight.nvidia.detect_gpus` (only called when something needs a GPU).
    ``owned_ports`` maps ports held by installed ``llm@`` instances to the instance name: a port taken by
    the same service is a WARN (the install restarts it), not a FAIL.
    """
    skip = parse_skip(skip)
    root = Path(root)
    ctx = _Context(manifest, root, owned_ports or {}, install_dir or root / INSTALL_DIR)
    if gpu_info is None and ctx.needs_gpu and not set(GPU_CHECKS) <= skip:
        gpu_info = detect_gpus()
    ctx.gpu_info = gpu_info or GpuInfo()
    results: list[CheckResult] = []
    for name in CHECKS:
        if name in skip:
            results.append(CheckResult(name, SKIP, f"skipped by --skip-check {name}",
                                       f"drop --skip-check {name} to run it"))
            continue
        results.extend(_CHECK_FUNCS[name](ctx))
    return results


_CHECK_FUNCS = {
    "driver": check_driver, "gpus": check_gpus, "tp-heads": check_tp_heads, "gpu-memory": check_gpu_memory,
    "compute-capability": check_compute_capability, "glibc": check_glibc, "arch": check_arch,
    "disk": check_disk, "ports": check_ports, "cluster": check_cluster, "api-keys": check_api_keys,
    "systemd": check_systemd,
    "libraries": check_libraries, "environment": check_environment, "compiler": check_compiler,
}
