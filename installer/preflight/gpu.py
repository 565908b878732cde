"""Preflight checks about the GPUs: driver, GPU count, tensor-parallel heads, GPU memory, compute capability."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from installer.bundle.manifest import ModelRecord, ServiceRecord
from installer.preflight import cuda as cudatable
from installer.preflight.context import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    FAIL,
    MIB,
    MIN_COMPUTE_CAPABILITY,
    MIN_KV_CACHE_BYTES,
    PASS,
    SKIP,
    WARN,
    WEIGHT_HEADROOM,
    CheckResult,
    _Context,
    _cpu_skip,
    _gib,
    _major,
    _required_driver,
    _version_tuple,
)
from installer.preflight.nvidia import Gpu, GpuInfo, compute_capability_tuple


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
