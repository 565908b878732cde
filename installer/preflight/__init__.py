"""Preflight: check the server against what MANIFEST.json needs, before anything is changed.

``run_preflight(manifest)`` returns one :class:`CheckResult` per check and subject (environment, service,
GPU); :func:`render_table` prints them as an aligned PASS/WARN/FAIL table with a remedy under every
WARN and FAIL, :func:`results_to_json` gives the same as JSON. Any FAIL refuses the install
(``install.sh --check`` exits non-zero); ``--skip-check NAME`` turns a check into a deliberate SKIP.

Modules: context.py (results, statuses, the shared context), gpu.py, host.py, libraries.py (the
checks, by subject), run.py (:func:`run_preflight`), render.py (table, JSON), cli.py (``python -m
installer.preflight``); nvidia.py reads the GPUs, cuda.py the CUDA → driver table.

Standard library only: this runs on the target with the bundle's own Python.
"""

from installer.preflight.cli import main
from installer.preflight.context import (
    CHECKS,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DISK_MARGIN,
    FAIL,
    GIB,
    GPU_CHECKS,
    INSTALL_DIR,
    MIB,
    MIN_COMPUTE_CAPABILITY,
    MIN_KV_CACHE_BYTES,
    PASS,
    SKIP,
    WARN,
    WEIGHT_HEADROOM,
    CheckResult,
    parse_skip,
)
from installer.preflight.gpu import check_compute_capability, check_driver, check_gpu_memory, check_gpus, check_tp_heads
from installer.preflight.host import (
    check_api_keys,
    check_arch,
    check_disk,
    check_glibc,
    check_ports,
    check_systemd,
    glibc_version,
    port_free,
)
from installer.preflight.libraries import LIBRARY_PACKAGES, check_libraries, system_libraries
from installer.preflight.render import failed, raise_on_failure, render_table, results_to_json, summary
from installer.preflight.run import run_preflight

__all__ = [
    "CHECKS", "CheckResult", "DEFAULT_GPU_MEMORY_UTILIZATION", "DISK_MARGIN", "FAIL", "GIB", "GPU_CHECKS",
    "INSTALL_DIR", "LIBRARY_PACKAGES", "MIB", "MIN_COMPUTE_CAPABILITY", "MIN_KV_CACHE_BYTES", "PASS", "SKIP",
    "WARN", "WEIGHT_HEADROOM", "check_api_keys", "check_arch", "check_compute_capability", "check_disk",
    "check_driver", "check_glibc", "check_gpu_memory", "check_gpus", "check_libraries", "check_ports",
    "check_systemd", "check_tp_heads", "failed", "glibc_version", "main", "parse_skip", "port_free",
    "raise_on_failure", "render_table", "results_to_json", "run_preflight", "summary", "system_libraries",
]
