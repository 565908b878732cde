"""The per-instance env file ``/etc/llm/<name>.env``: rendering (quoted, offline, paths, vLLM args) and parsing."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from installer.bundle import manifest as records
from installer.bundle.manifest import EnvironmentRecord, ServiceRecord
from installer.errors import InstallError, UsageError
from installer.preflight.toolchain import service_compiler
from installer.service.cluster import ClusterNode
from installer.service.paths import (
    _PLAIN_VALUE_RE,
    DEFAULT_ENTRYPOINT,
    SYSTEM_PATH,
    as_env,
    as_service,
    cache_dir,
    check_instance_name,
    log,
    unit_name,
)


def env_quote(value: str) -> str:
    """A value as systemd's EnvironmentFile= parser reads it back unchanged."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"environment value {value!r} contains a line break or NUL")
    if _PLAIN_VALUE_RE.fullmatch(value):
        return value
    escaped = "".join("\\" + c if c in '"\\`$' else c for c in value)
    return f'"{escaped}"'


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _command(env: EnvironmentRecord, env_prefix: Path) -> tuple[str, str]:
    """(absolute python, module) from the environment's ``vllm.command`` (``[bin/python, -m, module]``)."""
    cmd = list(env.vllm.command) if env.vllm is not None else []
    if len(cmd) >= 3 and cmd[1] == "-m":
        return str(env_prefix / cmd[0]), cmd[2]
    if cmd and cmd != ["bin/python", "-m"]:
        log.warning(
            "environment %s: vllm.command %r is not `python -m module`; using bin/python -m %s",
            env.name,
            cmd,
            DEFAULT_ENTRYPOINT,
        )
    return str(env_prefix / "bin" / "python"), DEFAULT_ENTRYPOINT


def _has_package(env: EnvironmentRecord, prefix: str) -> bool:
    """Whether the environment's lock lists a conda or pip package whose name starts with ``prefix``
    (an ``existing`` environment has no lock: assumed without)."""
    lock = env.lock or {}
    return any(str(p.get("name", "")).lower().replace("_", "-").startswith(prefix)
               for section in ("conda", "pip") for p in (lock.get(section) or ()) if isinstance(p, Mapping))


def render_env_file(
    service: ServiceRecord | Mapping,
    env_meta: EnvironmentRecord | Mapping,
    *,
    env_prefix: Path,
    model_path: str,
    hf_cache: Path | None,
    bundle: records.BundleInfo | Mapping | None = None,
    key_via_credential: bool = False,
    root: Path = Path("/"),
    adapters: Sequence[tuple[str, str, int]] = (),
    cluster: ClusterNode | None = None,
) -> str:
    """The text of ``/etc/llm/<service>.env`` (read by systemd and by the ``llm-serve`` launcher).

    ``service`` is a MANIFEST ``services[]`` entry, ``env_meta`` its ``environments[]`` entry,
    ``env_prefix`` the environment's install dir on the target, ``model_path`` what vLLM gets as ``--model``
    (a directory, or the repo id when ``hf_cache`` is the Hugging Face cache view to serve it from).
    The API key itself never appears: only ``LLM_API_KEY_FILE``, read by the launcher at start. With
    ``key_via_credential`` the key reaches the service through ``LoadCredential=`` (:func:`render_key_dropin`
    sets ``LLM_API_KEY_FILE`` to the credential) and the env file does not name the operator's file.
    ``root`` is the server's root (where a GPU service's C compiler is looked up, ``/`` but in tests).
    ``adapters`` are the LoRA adapters served with the model: ``(name, directory on the target, rank)``.
    ``cluster`` is this server's part in a service that spans nodes (installer/service/cluster.py): its
    address, interface, the head and the Ray settings the ``llm-ray`` launcher and ``llm-serve`` read.
    The service's task and adapters become vLLM arguments spelled for the environment's vLLM version
    (``installer/bundle/manifest/tasks.py``), placed before ``vllm_args``.
    """
    svc = as_service(service)
    env = as_env(env_meta)
    name = check_instance_name(svc.name)
    cpu = env.is_cpu
    python, module = _command(env, Path(env_prefix))
    cache = cache_dir(name)
    host = svc.host
    if isinstance(bundle, Mapping):
        bundle = records.BundleInfo(name=str(bundle.get("name")), version=str(bundle.get("version")))

    entries: dict[str, str] = {}

    def put(key: str, value: object) -> None:
        if value is not None:
            entries[key] = _fmt(value)

    put("LLM_INSTANCE", name)
    if bundle:
        put("LLM_BUNDLE", f"{bundle.name} {bundle.version}")
        put("LLM_BUNDLE_VERSION", bundle.version)
    put("LLM_ENVIRONMENT", env.name)
    # offline, no telemetry
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "VLLM_NO_USAGE_STATS",
        "DO_NOT_TRACK",
        "HF_HUB_DISABLE_TELEMETRY",
    ):
        put(key, 1)
    # vLLM guesses the host's address with a UDP connect towards 8.8.8.8 unless told; the address is only used
    # by vLLM's processes to reach each other, and a single-host server reaches them on loopback whatever
    # address the API listens on. Multi-host setups set VLLM_HOST_IP in the service's `env`.
    put("VLLM_HOST_IP", "127.0.0.1")
    if cluster is not None:  # a node of a multi-node service: its address on the cluster network, Ray's settings
        for key, value in cluster.env().items():
            put(key, value)
    # devices
    if not cpu and svc.gpus:
        put("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in svc.gpus))
    if cpu:
        put("VLLM_CPU_KVCACHE_SPACE", 1)  # GiB of KV cache; vLLM CPU refuses to guess
    # paths: the env's tools first (conda-pack shebangs are `#!/usr/bin/env python`), writable caches
    put("PATH", f"{Path(env_prefix) / 'bin'}:{SYSTEM_PATH}")
    put("HOME", cache)
    put("XDG_CACHE_HOME", cache / ".cache")
    put("VLLM_CACHE_ROOT", cache / "vllm")
    put("HF_HOME", cache / "huggingface")  # writable: trust-remote-code modules land in HF_HOME/modules
    if hf_cache is not None:
        put("HF_HUB_CACHE", hf_cache)
    if not cpu:
        # GPU starts compile (Triton launcher, torch.compile, CUDA graphs): the caches live with the instance,
        # so the post-install check's start warms the first real one; the compiler is named, not guessed
        put("TRITON_CACHE_DIR", cache / "triton")
        put("TORCHINDUCTOR_CACHE_DIR", cache / "inductor")
        if not _has_package(env, "flashinfer"):
            put("VLLM_USE_FLASHINFER_SAMPLER", 0)  # vLLM's sampler imports flashinfer otherwise
        put("CC", service_compiler(Path(root), svc, env, Path(env_prefix))[0])
        put("LLM_NEEDS_CC", 1)  # the launcher refuses to start without one (exit 78, one line saying why)
    # the launcher's inputs
    put("LLM_PYTHON", python)
    put("LLM_ENTRYPOINT", module)
    put("LLM_MODEL", model_path)
    put("LLM_SERVED_MODEL_NAME", svc.api_name)
    put("LLM_HOST", host)
    put("LLM_PORT", svc.port)
    put("LLM_MAX_MODEL_LEN", svc.max_model_len)
    put("LLM_TENSOR_PARALLEL_SIZE", svc.tensor_parallel_size)
    put("LLM_PIPELINE_PARALLEL_SIZE", svc.pipeline_parallel_size)
    put("LLM_DTYPE", svc.dtype)
    put("LLM_GPU_MEMORY_UTILIZATION", svc.gpu_memory_utilization)
    if svc.trust_remote_code:
        put("LLM_TRUST_REMOTE_CODE", 1)
    if svc.api_key_file and not key_via_credential:
        put("LLM_API_KEY_FILE", svc.api_key_file)
    version = env.vllm.version if env.vllm is not None else None
    problems = records.task_problems(svc.to_dict(), version)
    if problems:
        rel, msg = problems[0]
        raise InstallError(f"service {name}: {records.field_path(list(rel))}: {msg}")
    if svc.task != "generate":
        put("LLM_TASK", svc.task)
    args = records.task_flags(svc.task, svc.convert, version) + records.lora_flags(adapters, svc.max_lora_rank)
    for i, arg in enumerate([*args, *svc.vllm_args], start=1):
        put(f"LLM_ARG_{i}", arg)
    # the manifest's own variables last: they win over the defaults above (names and values are checked
    # by the service rules, installer/bundle/manifest/services.py)
    for key, value in svc.env.items():
        put(key, value)

    lines = [
        f"# /etc/llm/{name}.env: environment of {unit_name(name)}, written by the llm-pack installer.",
        "# The installer rewrites this file; change the manifest's services[] entry (env, vllm_args).",
        "# LLM_* variables are read by /opt/llm/bin/llm-serve, which builds the vLLM command line.",
    ]
    lines += [f"{k}={env_quote(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """Read back an env file written by :func:`render_env_file` (quoted values unescaped)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\`$])', r"\1", value[1:-1])
        out[key.strip()] = value
    return out
