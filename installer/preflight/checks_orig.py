"""Preflight: check the server against what MANIFEST.json needs, before anything is changed.

``run_preflight(manifest)`` returns one :class:`CheckResult` per check and subject (environment, service,
GPU); :func:`render_table` prints them as an aligned PASS/WARN/FAIL table with a remedy under every
WARN and FAIL, :func:`results_to_json` gives the same as JSON. Any FAIL refuses the install
(``install.sh --check`` exits non-zero); ``--skip-check NAME`` turns a check into a deliberate SKIP.

Standard library only: this runs on the target with the bundle's own Python.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from installer import cuda as cudatable
from installer.bundle import manifest as records
from installer.bundle import names
from installer.bundle.manifest import EnvironmentRecord, Manifest, ModelRecord, ServiceRecord
from installer.errors import BundleError, PreflightError, UsageError
from installer.gpu import Gpu, GpuInfo, compute_capability_tuple, detect_gpus
from installer.layout import STAGING

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
CHECKS = ("driver", "gpus", "tp-heads", "gpu-memory", "compute-capability", "glibc", "arch", "disk",
          "ports", "api-keys", "systemd", "libraries")
GPU_CHECKS = ("driver", "gpus", "gpu-memory", "compute-capability")
MIN_COMPUTE_CAPABILITY = (7, 5)          # vLLM's floor (Turing)
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9     # vLLM's default --gpu-memory-utilization
WEIGHT_HEADROOM = 1.1                    # weights' share × 1.1 must fit in total × utilisation
MIN_KV_CACHE_BYTES = 1 << 30             # less than this left for the KV cache → WARN
DISK_MARGIN = 1.1
INSTALL_DIR = names.INSTALL_DIR.lstrip("/")
GIB = 1 << 30
MIB = 1 << 20
LIBRARY_PACKAGES = Path(__file__).parent / "data" / "library_packages.json"
_ARCH_OF_PLATFORM = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le"}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class CheckResult:
    name: str            # one of CHECKS
    status: str          # PASS | WARN | FAIL | SKIP
    detail: str
    remedy: str = ""
    subject: str = ""    # environment, service or GPU the row is about

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _major(v: str) -> int:
    return _version_tuple(v)[0]


# --------------------------------------------------------------------------- the run


def parse_skip(values: Iterable[str]) -> set[str]:
    """``--skip-check`` values (repeatable, comma-separated) → set of check names; unknown names refused."""
    names: set[str] = set()
    for v in values:
        names.update(x.strip() for x in v.split(",") if x.strip())
    unknown = sorted(names - set(CHECKS))
    if unknown:
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, CHECKS, n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"unknown check name(s) for --skip-check: {', '.join(hints)}",
                         hint=f"known checks: {', '.join(CHECKS)}")
    return names


def run_preflight(manifest: Manifest | Mapping, *, root: Path = Path("/"), skip: Iterable[str] = frozenset(),
                  gpu_info: GpuInfo | None = None, owned_ports: Mapping[int, str] | None = None,
                  install_dir: Path | None = None) -> list[CheckResult]:
    """Run every check against ``root`` (``/`` = this server; another dir = a staging tree).

    ``manifest`` is the bundle's :class:`~installer.bundle.manifest.Manifest`, or a MANIFEST dict (validated here).

    ``gpu_info`` defaults to :func:`installer.gpu.detect_gpus` (only called when something needs a GPU).
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


class _Context:
    def __init__(self, manifest: Manifest | Mapping, root: Path, owned_ports: Mapping[int, str],
                 install_dir: Path):
        self.manifest: Manifest = records.as_manifest(manifest)
        self.root = root
        self.live = root.resolve() == Path("/")
        self.owned_ports = owned_ports
        self.install_dir = install_dir
        self.envs: dict[str, EnvironmentRecord] = {e.name: e for e in self.manifest.environments}
        self.models: dict[str, ModelRecord] = {m.name: m for m in self.manifest.models}
        self.services: list[ServiceRecord] = list(self.manifest.services)
        self.gpu_info = GpuInfo()

    def env_of(self, service: ServiceRecord) -> EnvironmentRecord | None:
        return self.envs.get(service.environment)

    def is_gpu_service(self, service: ServiceRecord) -> bool:
        env = self.env_of(service)
        return env is None or not env.is_cpu   # env installed earlier (model-only bundle): assume GPU

    @property
    def cuda_envs(self) -> list[EnvironmentRecord]:
        return [e for e in self.envs.values() if not e.is_cpu]

    @property
    def needs_gpu(self) -> bool:
        return bool(self.cuda_envs) or any(self.is_gpu_service(s) for s in self.services)

    def driver_needed(self) -> str:
        """The driver a remedy should ask for: the highest minimum among the CUDA environments."""
        best = ""
        for e in self.cuda_envs:
            want = _required_driver(e)[0] or _required_driver(e)[1]
            if want and (not best or cudatable.compare_versions(want, best) > 0):
                best = want
        return best or "the version your CUDA needs"

    def no_gpu_remedy(self) -> str:
        return (f"install NVIDIA driver ≥ {self.driver_needed()} and reboot; `nvidia-smi` must list the GPUs "
                "(or use an environment built for CPU: cuda: null)")


def _cpu_skip(name: str, subject: str) -> CheckResult:
    return CheckResult(name, SKIP, "environment built for CPU (cuda: null): no GPU needed", subject=subject)


def _tp_pp(service: ServiceRecord) -> tuple[int, int]:
    return service.tensor_parallel_size, service.pipeline_parallel_size


def _service_gpus(service: ServiceRecord, info: GpuInfo) -> tuple[list[Gpu], list[int]]:
    """(GPUs the service will use that exist, requested indices that do not exist)."""
    tp, pp = _tp_pp(service)
    wanted = service.gpus
    if wanted:
        present = [g for i in wanted if (g := info.gpu(i)) is not None]
        return present, [i for i in wanted if info.gpu(i) is None]
    return sorted(info.gpus, key=lambda g: g.index)[: tp * pp], []


# --------------------------------------------------------------------------- driver


def _required_driver(env: EnvironmentRecord) -> tuple[str | None, str | None]:
    """(exact minimum, minor-version-compatibility floor) for an environment's CUDA."""
    cuda = env.cuda_runtime or env.cuda
    min_d, floor = env.min_driver, env.driver_floor
    if cuda and not min_d:
        try:
            min_d = cudatable.min_driver(str(cuda))
        except (KeyError, ValueError, LookupError):
            min_d = None
    if cuda and not floor:
        try:
            floor = cudatable.driver_floor(str(cuda))
        except (KeyError, ValueError, LookupError):
            floor = None
    return min_d, floor


def check_driver(ctx: _Context) -> list[CheckResult]:
    out = []
    info = ctx.gpu_info
    for env in ctx.envs.values():
        name = env.name
        if env.is_cpu:
            out.append(_cpu_skip("driver", name))
            continue
        cuda = str(env.cuda_runtime or env.cuda)
        min_d, floor = _required_driver(env)
        want = min_d or floor
        get = f"install NVIDIA driver ≥ {want}" if want else f"install an NVIDIA driver for CUDA {cuda}"
        have = info.driver_version
        if not have:
            tried = "; ".join(info.notes) or "nvidia-smi, NVML, /proc/driver/nvidia/version"
            out.append(CheckResult("driver", FAIL, f"no NVIDIA driver found ({tried}); CUDA {cuda} needs "
                                   + (f"driver ≥ {want}" if want else f"a driver for CUDA {cuda}"),
                                   f"{get} and reboot",
                                   name))
            continue
        drv_cuda = info.cuda_version
        says = f"driver {have}" + (f" (supports CUDA ≤ {drv_cuda})" if drv_cuda else "")
        cmp = cudatable.compare_versions
        if drv_cuda and _major(cuda) > _major(drv_cuda):
            out.append(CheckResult(
                "driver", FAIL,
                f"{says}; CUDA {cuda} needs a driver for CUDA {_major(cuda)}.x"
                + (f" (≥ {want})" if want else "") + ": minor-version compatibility stops at the major",
                f"{get}, or rebuild the "
                f"environment for CUDA ≤ {drv_cuda} (environments[].cuda in the manifest)", name))
        elif floor and cmp(have, floor) < 0:
            out.append(CheckResult(
                "driver", FAIL, f"{says} < {floor}, the minimum for any CUDA {_major(cuda)}.x; CUDA {cuda} "
                f"needs ≥ {min_d or floor}",
                f"install NVIDIA driver ≥ {min_d or floor} (at least {floor}), or rebuild the environment for "
                f"a CUDA version this driver supports" + (f" (≤ {drv_cuda})" if drv_cuda else ""), name))
        elif min_d and cmp(have, min_d) < 0:
            out.append(CheckResult(
                "driver", WARN, f"{says} < {min_d} required by CUDA {cuda}; ≥ floor {floor}, so it runs "
                "under CUDA minor-version compatibility (no PTX JIT of newer kernels)",
                f"upgrade the NVIDIA driver to ≥ {min_d} for full CUDA {cuda} support"
                + (f", or rebuild the environment for CUDA ≤ {drv_cuda}" if drv_cuda else ""), name))
        elif not min_d and not floor:
            if drv_cuda and _version_tuple(cuda) <= _version_tuple(drv_cuda):
                out.append(CheckResult("driver", PASS, f"{says} ≥ CUDA {cuda} (not in the driver table)",
                                       subject=name))
            else:
                out.append(CheckResult("driver", WARN, f"{says}; CUDA {cuda} is not in the driver table, "
                                       "cannot tell its minimum driver",
                                       "check NVIDIA's CUDA release notes (table 3) for the driver it needs",
                                       name))
        else:
            out.append(CheckResult("driver", PASS, f"{says} ≥ {min_d} required by CUDA {cuda}", subject=name))
    return out


# --------------------------------------------------------------------------- GPUs


def check_gpus(ctx: _Context) -> list[CheckResult]:
    out = []
    info = ctx.gpu_info
    have = sorted(g.index for g in info.gpus)
    if not ctx.services and ctx.cuda_envs:
        if not info.gpus:
            return [CheckResult("gpus", FAIL, "no NVIDIA GPU detected", ctx.no_gpu_remedy(), "all")]
        return [CheckResult("gpus", PASS, f"{len(have)} GPU(s): {_gpu_list(info.gpus)}", subject="all")]
    for s in ctx.services:
        name = s.name
        if not ctx.is_gpu_service(s):
            out.append(_cpu_skip("gpus", name))
            continue
        tp, pp = _tp_pp(s)
        need = tp * pp
        wanted = list(s.gpus)
        formula = f"tensor_parallel_size {tp} × pipeline_parallel_size {pp} = {need}"
        if not info.gpus:
            why = f" ({'; '.join(info.notes)})" if info.notes and info.driver_version else ""
            out.append(CheckResult("gpus", FAIL, f"no NVIDIA GPU detected{why}; the service needs {need}",
                                   ctx.no_gpu_remedy(), name))
            continue
        present, missing = _service_gpus(s, info)
        if missing:
            out.append(CheckResult("gpus", FAIL, f"GPU index(es) {missing} do not exist; this server has {have}",
                                   f"set services[{name}].gpus to existing indices (from {have}) and rebuild "
                                   "the bundle", name))
        elif len(set(wanted)) != len(wanted):
            out.append(CheckResult("gpus", FAIL, f"gpus {wanted} lists an index twice",
                                   "list each GPU once in services[].gpus", name))
        elif wanted and len(wanted) < need:
            out.append(CheckResult("gpus", FAIL, f"{len(wanted)} GPU(s) {wanted} < {formula}",
                                   f"give the service {need} GPUs or lower tensor_parallel_size", name))
        elif not wanted and len(have) < need:
            out.append(CheckResult("gpus", FAIL, f"this server has {len(have)} GPU(s) {have} < {formula}",
                                   f"lower tensor_parallel_size / pipeline_parallel_size to fit {len(have)} "
                                   "GPU(s)", name))
        elif wanted and len(wanted) > need:
            out.append(CheckResult("gpus", WARN, f"{len(wanted)} GPUs {wanted} listed but {formula}: only the "
                                   f"first {need} are used", f"list exactly {need} GPUs or raise "
                                   "tensor_parallel_size", name))
        else:
            used = wanted or [g.index for g in present]
            out.append(CheckResult("gpus", PASS, f"GPU(s) {used} present ({present[0].name}); {formula}",
                                   subject=name))
    return out


def _gpu_list(gpus: Iterable[Gpu]) -> str:
    return ", ".join(f"{g.index}: {g.name}" for g in gpus)


def _num_heads(config: Mapping) -> int | None:
    for c in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        for key in ("num_attention_heads", "n_head", "num_heads"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def check_tp_heads(ctx: _Context) -> list[CheckResult]:
    out = []
    for s in ctx.services:
        name = s.name
        tp, _ = _tp_pp(s)
        model = ctx.models.get(s.model)
        if model is None:
            out.append(CheckResult("tp-heads", SKIP, f"model {s.model!r} is not in this bundle",
                                   subject=name))
            continue
        heads = _num_heads(model.config)
        if heads is None:
            out.append(CheckResult("tp-heads", WARN if tp > 1 else PASS,
                                   f"config.json of {model.name} has no num_attention_heads; tp {tp}",
                                   "check that the model's attention heads divide tensor_parallel_size"
                                   if tp > 1 else "", name))
        elif heads % tp:
            good = [d for d in range(1, min(heads, 16) + 1) if heads % d == 0]
            out.append(CheckResult("tp-heads", FAIL, f"num_attention_heads {heads} of {model.name} is not "
                                   f"divisible by tensor_parallel_size {tp}",
                                   f"use a tensor_parallel_size that divides {heads}: {good}", name))
        else:
            out.append(CheckResult("tp-heads", PASS, f"num_attention_heads {heads} / tensor_parallel_size {tp}"
                                   f" = {heads // tp} per GPU", subject=name))
    return out


def _model_bytes(model: ModelRecord) -> int:
    return model.size


def check_gpu_memory(ctx: _Context) -> list[CheckResult]:
    out = []
    info = ctx.gpu_info
    shares: dict[int, list[tuple[str, float]]] = {}
    for s in ctx.services:
        name = s.name
        if not ctx.is_gpu_service(s):
            out.append(_cpu_skip("gpu-memory", name))
            continue
        if not info.gpus:
            out.append(CheckResult("gpu-memory", FAIL, "no NVIDIA GPU detected", ctx.no_gpu_remedy(), name))
            continue
        model = ctx.models.get(s.model)
        if model is None:
            out.append(CheckResult("gpu-memory", SKIP, f"model {s.model!r} is not in this bundle: "
                                   "weights size unknown", subject=name))
            continue
        present, missing = _service_gpus(s, info)
        if not present:
            out.append(CheckResult("gpu-memory", FAIL, f"none of GPUs {missing} exist (see gpus)",
                                   "fix services[].gpus first", name))
            continue
        tp, pp = _tp_pp(s)
        util = float(s.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION)
        weights = _model_bytes(model)
        share = weights / (tp * pp) * WEIGHT_HEADROOM
        formula = (f"weights {_gib(weights)} / (tp {tp} × pp {pp}) × {WEIGHT_HEADROOM} = {_gib(share)} per GPU")
        for g in present:
            shares.setdefault(g.index, []).append((name, util))
        small = [g for g in present if g.memory_total_mib is not None and g.memory_total_mib * MIB * util < share]
        unknown = [g for g in present if g.memory_total_mib is None]
        g0 = min(present, key=lambda g: g.memory_total_mib or 0)
        if small:
            g = small[0]
            budget = g.memory_total_mib * MIB * util
            need_gpus = -(-int(weights * WEIGHT_HEADROOM) // int(budget)) if budget else 0
            out.append(CheckResult(
                "gpu-memory", FAIL, f"{formula} > GPU {g.index} {g.memory_total_mib} MiB × {util} = "
                f"{_gib(budget)}",
                f"spread the model over more GPUs (about {need_gpus}: tensor_parallel_size and gpus), raise "
                "gpu_memory_utilization, or serve a smaller/quantised model", name))
            continue
        if unknown:
            out.append(CheckResult("gpu-memory", WARN, f"{formula}; memory of GPU(s) "
                                   f"{[g.index for g in unknown]} unknown", "check `nvidia-smi` by hand", name))
            continue
        budget = g0.memory_total_mib * MIB * util
        text = f"{formula} ≤ {g0.memory_total_mib} MiB × {util} = {_gib(budget)} (GPU {g0.index})"
        busy = [g for g in present if g.memory_free_mib is not None
                and g.memory_free_mib * MIB < g.memory_total_mib * MIB * util]
        if budget - share < MIN_KV_CACHE_BYTES:
            out.append(CheckResult("gpu-memory", WARN, f"{text}; only {_gib(budget - share)} left for the KV "
                                   "cache", "raise gpu_memory_utilization or tensor_parallel_size, or lower "
                                   "max_model_len", name))
        elif busy:
            g = busy[0]
            out.append(CheckResult("gpu-memory", WARN, f"{text}; but GPU {g.index} has only "
                                   f"{g.memory_free_mib} MiB free now (vLLM wants {util} × total free at start)",
                                   "stop what uses the GPU (`nvidia-smi` lists it) before starting the "
                                   "service, unless it is this service's previous version", name))
        else:
            out.append(CheckResult("gpu-memory", PASS, text, subject=name))
    for index, users in sorted(shares.items()):
        total = sum(u for _, u in users)
        if len(users) > 1 and total > 1.0:
            who = " + ".join(f"{n} ({u})" for n, u in users)
            out.append(CheckResult("gpu-memory", FAIL, f"GPU {index} shared by {who} = {total:.2f} > 1.0",
                                   "give the services different GPUs or lower their gpu_memory_utilization so "
                                   "the sum is ≤ 1.0", f"GPU {index}"))
    return out


def check_compute_capability(ctx: _Context) -> list[CheckResult]:
    out = []
    info = ctx.gpu_info
    floor = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
    subjects: list[tuple[str, list[Gpu]]] = []
    if not ctx.services and ctx.cuda_envs:
        subjects.append(("all", list(info.gpus)))
    for s in ctx.services:
        if not ctx.is_gpu_service(s):
            out.append(_cpu_skip("compute-capability", s.name))
            continue
        subjects.append((s.name, _service_gpus(s, info)[0]))
    for name, gpus in subjects:
        if not info.gpus:
            out.append(CheckResult("compute-capability", FAIL, "no NVIDIA GPU detected", ctx.no_gpu_remedy(),
                                   name))
            continue
        if not gpus:
            out.append(CheckResult("compute-capability", FAIL, "none of the requested GPUs exist (see gpus)",
                                   "fix services[].gpus first", name))
            continue
        low = [g for g in gpus if (cc := compute_capability_tuple(g.compute_capability)) and cc
               < MIN_COMPUTE_CAPABILITY]
        unknown = [g for g in gpus if compute_capability_tuple(g.compute_capability) is None]
        desc = ", ".join(f"GPU {g.index} {g.compute_capability or '?'}" for g in gpus)
        if low:
            out.append(CheckResult("compute-capability", FAIL, f"{desc}: {low[0].name} is below vLLM's floor "
                                   f"{floor}", f"use GPUs of compute capability ≥ {floor} (Turing or newer)",
                                   name))
        elif unknown:
            out.append(CheckResult("compute-capability", WARN, f"{desc}: unknown for some GPUs",
                                   f"check with `nvidia-smi --query-gpu=compute_cap --format=csv` (need ≥ "
                                   f"{floor})", name))
        else:
            out.append(CheckResult("compute-capability", PASS, f"{desc} ≥ {floor}", subject=name))
    return out


# --------------------------------------------------------------------------- host


_LIBC_RELEASE = re.compile(rb"release version (\d+\.\d+)")
_LIB_DIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "usr/local/lib", "lib/x86_64-linux-gnu",
             "usr/lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu",
             "lib/powerpc64le-linux-gnu", "usr/lib/powerpc64le-linux-gnu")


def glibc_version(root: Path = Path("/")) -> str | None:
    """The glibc of ``root``: ``os.confstr`` for the running system, else read from root's libc.so.6."""
    if Path(root).resolve() == Path("/"):
        try:
            text = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):
            text = ""
        m = re.search(r"(\d+\.\d+)", text)
        if m:
            return m.group(1)
    for d in _LIB_DIRS:
        libc = Path(root) / d / "libc.so.6"
        if libc.is_file():
            m = _LIBC_RELEASE.search(libc.read_bytes())
            if m:
                return m.group(1).decode()
    return None


def check_glibc(ctx: _Context) -> list[CheckResult]:
    have = glibc_version(ctx.root)
    target_floor = ctx.manifest.target.glibc
    out = []
    for env in ctx.envs.values():
        name = env.name
        floor = env.glibc or target_floor
        if not floor:
            out.append(CheckResult("glibc", SKIP, "no glibc floor recorded for this environment", subject=name))
        elif have is None:
            out.append(CheckResult("glibc", WARN, f"cannot read this server's glibc version (need ≥ {floor})",
                                   f"check with `ldd --version` (need ≥ {floor})", name))
        elif _version_tuple(have) < _version_tuple(floor):
            out.append(CheckResult("glibc", FAIL, f"glibc {have} < {floor} required by the environment",
                                   f"rebuild the bundle with target.glibc: \"{have}\" so the solver picks "
                                   "packages this server can run, or upgrade the OS", name))
        else:
            out.append(CheckResult("glibc", PASS, f"glibc {have} ≥ {floor}", subject=name))
    return out


def _machine() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def check_arch(ctx: _Context) -> list[CheckResult]:
    target = ctx.manifest.target
    wanted: dict[str, str] = {}
    if target.arch or target.platform:
        wanted["target"] = target.arch or _ARCH_OF_PLATFORM.get(target.platform, target.platform)
    for env in ctx.envs.values():
        if env.platform:
            wanted[env.name] = _ARCH_OF_PLATFORM.get(env.platform, env.platform)
    have = _machine()
    if not wanted:
        return [CheckResult("arch", SKIP, f"bundle names no platform (this server: {have})", subject="target")]
    out = []
    for subject, arch in wanted.items():
        arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
        if arch != have:
            plat = next((p for p, a in _ARCH_OF_PLATFORM.items() if a == have), f"linux-{have}")
            out.append(CheckResult("arch", FAIL, f"built for {arch}, this server is {have}",
                                   f"build the bundle for platform {plat} (target.platform in the manifest)",
                                   subject))
        else:
            out.append(CheckResult("arch", PASS, f"{arch} = this server ({have})", subject=subject))
    return out


def _existing_ancestor(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: _Context) -> list[CheckResult]:
    envs = models = 0
    present = []
    for env in ctx.envs.values():
        target = ctx.install_dir / "envs" / env.name / env.content_hash[:16]
        if target.is_dir():
            present.append(env.name)
        else:
            envs += env.unpacked_size or 0
    for m in ctx.models.values():
        target = ctx.install_dir / "models" / m.name / m.commit
        if target.is_dir():
            present.append(m.name)
        else:
            models += _model_bytes(m)
    need = int((envs + models) * DISK_MARGIN)
    where = _existing_ancestor(ctx.install_dir)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    formula = (f"(environments {_gib(envs)} + models {_gib(models)}) × {DISK_MARGIN} = {_gib(need)}"
               + (f" (already installed: {', '.join(present)})" if present else ""))
    if free < need:
        return [CheckResult("disk", FAIL, f"{formula} > {_gib(free)} free at {where}",
                            f"free {_gib(need - free)} on the filesystem holding {ctx.install_dir} "
                            "(old versions: `install.sh --uninstall` of unused bundles)", str(ctx.install_dir))]
    results = [CheckResult("disk", PASS, f"{formula} ≤ {_gib(free)} free at {where}", subject=str(ctx.install_dir))]
    # Everything is staged and verified under /var/lib/llm/staging first, then renamed into place: on one
    # filesystem that costs nothing more; on another, the staged copy needs the same room there too.
    staging = ctx.root / STAGING.lstrip("/")
    s_where = _existing_ancestor(staging)
    if need and os.stat(s_where).st_dev != os.stat(where).st_dev:
        s_st = os.statvfs(s_where)
        s_free = s_st.f_bavail * s_st.f_frsize
        detail = f"staging {_gib(need)} {'>' if s_free < need else '≤'} {_gib(s_free)} free at {s_where}"
        if s_free < need:
            results.append(CheckResult("disk", FAIL, detail,
                                       f"free {_gib(need - s_free)} on the filesystem holding {staging} (the "
                                       "installer verifies everything there before placing it)", str(staging)))
        else:
            results.append(CheckResult("disk", PASS, detail, subject=str(staging)))
    return results


def port_free(host: str, port: int) -> OSError | None:
    """Try to bind ``host:port`` as vLLM (uvicorn) does; None when free, else the error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e
    return None


def check_ports(ctx: _Context) -> list[CheckResult]:
    if not ctx.services:
        return []
    if not ctx.live:
        return [CheckResult("ports", SKIP, f"staging root {ctx.root}: ports are checked on the server that runs "
                            "it", subject=s.name) for s in ctx.services]
    out = []
    by_port: dict[int, list[str]] = {}
    for s in ctx.services:
        by_port.setdefault(s.port, []).append(s.name)
    for s in ctx.services:
        name, port, host = s.name, s.port, s.host
        others = [n for n in by_port[port] if n != name]
        if others:
            out.append(CheckResult("ports", FAIL, f"port {port} also used by service(s) {others} of this bundle",
                                   "give each service its own port", name))
            continue
        err = port_free(host, port)
        if err is None:
            out.append(CheckResult("ports", PASS, f"{host}:{port} free", subject=name))
        elif err.errno == errno.EADDRINUSE:
            owner = ctx.owned_ports.get(port)
            if owner == name:
                out.append(CheckResult("ports", WARN, f"{host}:{port} in use by llm@{name}, which this install "
                                       "restarts on the new version", "none needed; the port is taken over",
                                       name))
            elif owner:
                out.append(CheckResult("ports", FAIL, f"{host}:{port} in use by another instance llm@{owner}",
                                       f"change services[{name}].port or uninstall llm@{owner}", name))
            else:
                out.append(CheckResult("ports", FAIL, f"{host}:{port} in use by another program",
                                       f"`ss -ltnp 'sport = :{port}'` shows who holds it: stop it or change "
                                       f"services[{name}].port", name))
        else:
            out.append(CheckResult("ports", FAIL, f"cannot bind {host}:{port}: {err.strerror or err}",
                                   "use an address of this server (or 0.0.0.0) in services[].host", name))
    return out


def check_api_keys(ctx: _Context) -> list[CheckResult]:
    """API key files must be in place and usable before anything starts; a service that listens beyond
    loopback without one is a WARN (anyone who reaches the address can use the API)."""
    from installer import systemd

    out = []
    credentials = systemd.uses_credentials(ctx.root)
    how = ("systemd reads it as root (LoadCredential=)" if credentials
           else f"the service user {systemd.USER} reads it (this systemd has no LoadCredential=)")
    for s in ctx.services:
        if s.api_key_file is None:
            if not records.is_loopback(s.host):
                out.append(CheckResult("api-keys", WARN, f"listens on {s.host}:{s.port} without api_key_file: "
                                       "anyone who can reach this address can use the API",
                                       "set api_key_file: in the manifest (a file on this server), or host: "
                                       "127.0.0.1", s.name))
            else:
                out.append(CheckResult("api-keys", PASS, f"no API key; listens on loopback {s.host} only",
                                       subject=s.name))
            continue
        problems = systemd.check_api_key_file(ctx.root, s.api_key_file, via_credential=credentials)
        if not problems:
            out.append(CheckResult("api-keys", PASS, f"{s.api_key_file} in place; {how}", subject=s.name))
        elif not ctx.live:  # a staging tree: the key is put on the server that boots it
            out.append(CheckResult("api-keys", WARN, f"staging root {ctx.root}: " + "; ".join(problems),
                                   "put the key file in place on the server before starting the service "
                                   f"({systemd.key_install_command(s.api_key_file, via_credential=credentials)})",
                                   s.name))
        else:
            out.append(CheckResult("api-keys", FAIL, "; ".join(problems),
                                   f"{systemd.key_install_command(s.api_key_file, via_credential=credentials)} "
                                   "(a file with the key on its first line), then run the install again",
                                   s.name))
    return out


def check_systemd(ctx: _Context) -> list[CheckResult]:
    if not ctx.live:
        unit_dir = ctx.root / "etc/systemd/system"
        ok = any((ctx.root / p).exists() for p in ("usr/bin/systemctl", "bin/systemctl")) or unit_dir.is_dir()
        if ok:
            return [CheckResult("systemd", PASS, f"staging root {ctx.root} has systemd (not booted)",
                                subject="host")]
        return [CheckResult("systemd", WARN, f"staging root {ctx.root} has no systemd; units are written to "
                            f"{unit_dir} anyway", "install systemd in the image that boots this tree",
                            "host")]
    booted = Path("/run/systemd/system").is_dir()
    systemctl = shutil.which("systemctl")
    if booted and systemctl:
        return [CheckResult("systemd", PASS, f"systemd is PID 1 ({systemctl})", subject="host")]
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    what = "not booted with systemd" if not booted else "systemctl is not on PATH"
    return [CheckResult("systemd", FAIL, f"{what} (PID 1 is {pid1})",
                        "run on a systemd server, or use --root DIR to stage the install, or --skip-check "
                        "systemd and start vLLM yourself", "host")]


def _ld_so_conf_dirs(root: Path) -> list[Path]:
    dirs: list[Path] = []
    confs = [root / "etc/ld.so.conf"]
    seen = set()
    while confs:
        conf = confs.pop()
        if conf in seen or not conf.is_file():
            continue
        seen.add(conf)
        for line in conf.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("include"):
                pattern = line.split(None, 1)[1].lstrip("/")
                confs.extend(sorted(root.glob(pattern)))
            elif line.startswith("/"):
                dirs.append(root / line.lstrip("/"))
    return dirs


def system_libraries(root: Path = Path("/")) -> set[str]:
    """Sonames this server provides: ``ldconfig -p`` (running system) plus the standard and ld.so.conf dirs."""
    names: set[str] = set()
    root = Path(root)
    if root.resolve() == Path("/"):
        ldconfig = shutil.which("ldconfig") or next(
            (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
        if ldconfig:
            try:
                text = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30,
                                      check=False).stdout
                names.update(m.group(1) for m in re.finditer(r"^\s+(\S+)\s+\(", text, re.M))
            except (OSError, subprocess.TimeoutExpired):
                pass
    for d in [root / d for d in _LIB_DIRS] + _ld_so_conf_dirs(root):
        try:
            names.update(p.name for p in d.iterdir() if ".so" in p.name)
        except OSError:
            continue
    return names


def _library_packages() -> dict[str, dict[str, str]]:
    try:
        return json.loads(LIBRARY_PACKAGES.read_text())["libraries"]
    except (OSError, ValueError, KeyError):
        return {}


# A missing library is fatal unless every file needing it is a known optional part: stdlib extras a server
# never uses (Tk, NIS, curses, readline, dbm), Intel OpenMP offload/SYCL plugins that ship with intel-openmp
# and are loaded only on request, numba's alternative thread pools. Anything else (vLLM's and torch's
# compiled code, the interpreter, stdlib modules such as _sqlite3 that vLLM imports) is required.
_OPTIONAL_NEEDERS = ("/lib-dynload/_tkinter", "/lib-dynload/nis.", "/lib-dynload/readline.", "/lib-dynload/_curses",
                     "/lib-dynload/_dbm", "/lib-dynload/_gdbm", "lib/libomptarget", "lib/libur_", "lib/libpi_",
                     "lib/libarcher", "lib/libsycl", "/numba/np/ufunc/omppool", "/numba/np/ufunc/tbbpool")


def _core_needers(env: EnvironmentRecord, lib: str) -> list[str]:
    needers = env.needed_by.get(lib)
    if not needers:  # bundles without needed_by: treat every library as required
        return ["(unknown)"]
    return [f for f in needers if not any(o in f"/{f}" for o in _OPTIONAL_NEEDERS)]


def check_libraries(ctx: _Context) -> list[CheckResult]:
    envs = [e for e in ctx.envs.values()]
    if not envs:
        return []
    provided = system_libraries(ctx.root)
    packages = _library_packages()
    out = []
    for env in envs:
        name = env.name
        needed = list(env.needed_libraries)
        missing = [lib for lib in needed if lib not in provided]
        if not missing:
            out.append(CheckResult("libraries", PASS, f"all {len(needed)} needed system libraries found"
                                   + (f" ({', '.join(needed)})" if needed else ""), subject=name))
            continue
        optional = [lib for lib in missing if not _core_needers(env, lib)]
        if optional:
            out.append(CheckResult(
                "libraries", WARN,
                "optional parts will not load, missing: " + "; ".join(
                    f"{lib} (needed by {', '.join(env.needed_by.get(lib, ())[:2])})"
                    for lib in optional),
                "ignore unless you use those parts; otherwise install the libraries", name))
            missing = [lib for lib in missing if lib not in optional]
            if not missing:
                continue
        described, debian, rhel = [], [], []
        for lib in missing:
            pkg = packages.get(lib)
            if pkg:
                described.append(f"{lib} (Debian/Ubuntu: {pkg['debian']}, RHEL: {pkg['rhel']})")
                debian.append(pkg["debian"].split()[0])
                rhel.append(pkg["rhel"].split()[0])
            else:
                described.append(f"{lib} (package unknown: `apt-file search {lib}` / `dnf provides '*/{lib}'`)")
        remedy = "install the package(s) from the distribution's offline media"
        if debian:
            remedy += (f": `apt-get install {' '.join(dict.fromkeys(debian))}` or "
                       f"`dnf install {' '.join(dict.fromkeys(rhel))}`")
        out.append(CheckResult("libraries", FAIL, f"missing on this server: {'; '.join(described)}", remedy,
                               name))
    return out


_CHECK_FUNCS = {
    "driver": check_driver, "gpus": check_gpus, "tp-heads": check_tp_heads, "gpu-memory": check_gpu_memory,
    "compute-capability": check_compute_capability, "glibc": check_glibc, "arch": check_arch,
    "disk": check_disk, "ports": check_ports, "api-keys": check_api_keys, "systemd": check_systemd,
    "libraries": check_libraries,
}


# --------------------------------------------------------------------------- output


def summary(results: Iterable[CheckResult]) -> dict[str, int]:
    counts = {PASS: 0, WARN: 0, FAIL: 0, SKIP: 0}
    for r in results:
        counts[r.status] += 1
    return counts


def failed(results: Iterable[CheckResult]) -> bool:
    return any(r.status == FAIL for r in results)


def render_table(results: list[CheckResult]) -> str:
    """Aligned table; a ``remedy:`` line under every non-PASS row that has one; a summary line last."""
    rows = [("STATUS", "CHECK", "SUBJECT", "DETAIL")] + [(r.status, r.name, r.subject, r.detail)
                                                         for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    indent = " " * (sum(w) + 6)
    lines = []
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:<{w[2]}}  {row[3]}".rstrip())
        r = results[i - 1] if i else None
        if r is not None and r.status != PASS and r.remedy:
            lines.append(f"{indent}remedy: {r.remedy}")
    c = summary(results)
    verdict = "FAIL: install refused" if c[FAIL] else "OK"
    lines.append(f"preflight: {c[PASS]} PASS, {c[WARN]} WARN, {c[FAIL]} FAIL, {c[SKIP]} SKIP -> {verdict}")
    return "\n".join(lines) + "\n"


def results_to_json(results: list[CheckResult]) -> str:
    return json.dumps({"ok": not failed(results), "summary": summary(results),
                       "checks": [r.to_dict() for r in results]}, indent=1, ensure_ascii=False) + "\n"


def raise_on_failure(results: list[CheckResult]) -> None:
    bad = [r for r in results if r.status == FAIL]
    if bad:
        raise PreflightError(f"{len(bad)} preflight check(s) failed: "
                             + ", ".join(f"{r.name} ({r.subject})" if r.subject else r.name for r in bad),
                             hint="fix what the table says, or pass --skip-check NAME to override deliberately")


# --------------------------------------------------------------------------- command line


def _load_manifest(path: Path) -> Manifest:
    if path.is_dir():
        path = path / "MANIFEST.json"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}",
                         hint="pass a bundle directory or its MANIFEST.json") from e
    return Manifest.from_json(data, source=str(path), partial=True)  # the server's needs; not the files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m installer.preflight",
                                description="Check this server against a bundle's MANIFEST.json.")
    p.add_argument("manifest", type=Path, help="bundle directory or MANIFEST.json")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--skip-check", action="append", default=[], metavar="NAME",
                   help=f"repeatable or comma-separated; one of: {', '.join(CHECKS)}")
    p.add_argument("--gpu-info", type=Path, help="use this GpuInfo JSON instead of detecting")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        manifest = _load_manifest(args.manifest)
        gpu_info = None
        if args.gpu_info:
            try:
                d = json.loads(args.gpu_info.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read --gpu-info {args.gpu_info}: {e}") from e
            gpu_info = GpuInfo(driver_version=d.get("driver_version"), cuda_version=d.get("cuda_version"),
                               gpus=tuple(Gpu(**g) for g in d.get("gpus", [])), source=d.get("source", "file"))
        results = run_preflight(manifest, root=args.root, skip=args.skip_check, gpu_info=gpu_info)
    except (UsageError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    sys.stdout.write(results_to_json(results) if args.json else render_table(results))
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
