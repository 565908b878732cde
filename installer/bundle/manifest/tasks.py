"""What a service serves (``task``: generate, embed, score), LoRA adapters, and how each is spelled for the
vLLM version of the service's environment.

vLLM changed the spelling of pooling models: up to 0.10.0 ``--task embed`` / ``--task score``; from 0.10.1
``--runner pooling`` (and ``--convert embed|classify`` to adapt a generative model); ``--task`` was removed
by 0.13. The version is the one ``pack build`` recorded in ``environments[].vllm.version``. The rules here
run on the target (MANIFEST.json) and at ``pack validate``/``pack build`` (manifest.yaml, with file:line),
so a spelling the environment's vLLM would refuse is named before anything starts. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from installer.bundle.manifest.rules import Problem

TASKS = ("generate", "embed", "score")
CONVERTS = ("embed", "classify")
# vLLM's --max-lora-rank accepts only these (vllm/config/lora.py MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORA_RANK = LORA_RANKS[-1]
RUNNER_SINCE = (0, 10, 1)  # --runner/--convert appeared (vLLM PR 21470), --task deprecated
TASK_REMOVED_IN = (0, 13, 0)
POOLING_FLAGS = ("--task", "--runner", "--convert")
LORA_FLAGS = ("--enable-lora", "--lora-modules", "--max-lora-rank")

_VERSION_RE = re.compile(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?")


def parse_version(version: str | None) -> tuple[int, int, int] | None:
    """``"0.32.0"`` → ``(0, 32, 0)``; ``"0.10.1rc2+cpu"`` → ``(0, 10, 1)``; None when there is none."""
    m = _VERSION_RE.match(version or "")
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _dotted(v: tuple[int, int, int]) -> str:
    return ".".join(str(x) for x in v)


def task_flags(task: str | None, convert: str | None, version: str | None) -> list[str]:
    """The vLLM arguments that select ``task`` for the given vLLM version (unknown: the current spelling)."""
    task = task or "generate"
    if task == "generate":
        return []
    v = parse_version(version)
    if v is not None and v < RUNNER_SINCE:
        return ["--task", task]
    return ["--runner", "pooling"] + (["--convert", convert] if convert else [])


def task_problems(svc: Mapping, version: str | None) -> list[Problem]:
    """``task``/``convert``/``vllm_args`` against the environment's vLLM ``version`` (None: unknown, only
    the checks that hold for every version)."""
    out: list[Problem] = []
    task = svc.get("task") or "generate"
    convert = svc.get("convert")
    v = parse_version(version)
    named = f"vLLM {version}" if version else "vLLM"
    if convert is not None and task == "generate":
        out.append((("convert",), f"convert: {convert} applies to task: embed or score (this service has "
                                  "task: generate); remove it or set task:"))
    elif convert is not None and v is not None and v < RUNNER_SINCE:
        out.append((("convert",), f"{named} (the environment's) has no --convert (it came with --runner in "
                                  f"{_dotted(RUNNER_SINCE)}): remove convert: (task: {task} is spelled "
                                  f"--task {task} for this version), or use vLLM >= {_dotted(RUNNER_SINCE)}"))
    args = svc.get("vllm_args")
    for i, arg in enumerate(args if isinstance(args, (list, tuple)) else ()):
        if not isinstance(arg, str):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in POOLING_FLAGS:
            continue
        if flag == "--task" and v is not None and v >= TASK_REMOVED_IN:
            out.append((("vllm_args", i), f"{named} (the environment's) has no --task (removed in "
                                          f"{_dotted(TASK_REMOVED_IN)[:-2]}): set task: embed or score "
                                          "(rendered as --runner pooling) and remove this argument"))
        elif flag in ("--runner", "--convert") and v is not None and v < RUNNER_SINCE:
            out.append((("vllm_args", i), f"{named} (the environment's) has no {flag} (it came in "
                                          f"{_dotted(RUNNER_SINCE)}): set task: embed or score (rendered as "
                                          "--task for this version) and remove this argument"))
        elif task != "generate":
            out.append((("vllm_args", i), f"{flag} in vllm_args conflicts with task: {task}"
                                          f"{f' / convert: {convert}' if convert else ''} (the installer "
                                          "writes the flags for the environment's vLLM); remove it"))
    return out


def lora_rank_for(ranks: Iterable[int], given: int | None = None) -> int:
    """``--max-lora-rank``: the service's ``max_lora_rank``, else the smallest rank vLLM accepts that holds
    every adapter's rank."""
    if given is not None:
        return given
    need = max(ranks, default=1)
    return next((r for r in LORA_RANKS if r >= need), MAX_LORA_RANK)


def lora_flags(adapters: Sequence[tuple[str, str, int]], max_lora_rank: int | None = None) -> list[str]:
    """``--enable-lora --lora-modules name=path ... --max-lora-rank N`` for ``(name, path, rank)`` adapters
    (none: no flags)."""
    if not adapters:
        return []
    flags = ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path, _ in adapters)]
    flags += ["--max-lora-rank", str(lora_rank_for((r for _, _, r in adapters), max_lora_rank))]
    if len(adapters) > 1:
        flags += ["--max-loras", str(len(adapters))]
    return flags


def rank_problem(rank: int, limit: int | None = None) -> str | None:
    """Why an adapter of LoRA ``rank`` cannot be served (``limit``: the service's ``max_lora_rank``)."""
    if limit is not None and rank > limit:
        return f"LoRA rank {rank} exceeds the service's max_lora_rank {limit}: raise max_lora_rank " \
               f"(one of {', '.join(map(str, LORA_RANKS))}) or use an adapter of rank <= {limit}"
    if rank > MAX_LORA_RANK:
        return f"LoRA rank {rank} exceeds {MAX_LORA_RANK}, the largest vLLM serves (--max-lora-rank)"
    return None


def adapter_problems(models: Sequence[Mapping], services: Sequence[Mapping]) -> list[tuple[tuple, str]]:
    """Cross-checks of MANIFEST ``models[]`` (an adapter has ``adapter: {base, rank}``) and ``services[]``:
    every adapter's base is a model (not an adapter) of the same manifest, its rank is one vLLM serves and
    within the limit of each (task: generate) service of its base; a service serves a base model, never an
    adapter.
    Returns ``(path from the MANIFEST root, message)``."""
    out: list[tuple[tuple, str]] = []
    bases = {m.get("name") for m in models if not m.get("adapter")}
    adapters = {m.get("name"): m for m in models if m.get("adapter")}
    for i, m in enumerate(models):
        a = m.get("adapter")
        if not a:
            continue
        base = a.get("base")
        if base not in bases:
            what = "an adapter" if base in adapters else "not a model of this bundle"
            out.append((("models", i, "adapter", "base"), f"the base model {base!r} of adapter {m.get('name')!r} "
                                                          f"is {what}: name one of {sorted(map(str, bases))}"))
        bad = rank_problem(int(a.get("rank") or 0))
        if bad:
            out.append((("models", i, "adapter", "rank"), bad))
    for j, s in enumerate(services):
        if s.get("model") in adapters:
            base = adapters[s["model"]]["adapter"].get("base")
            out.append((("services", j, "model"), f"{s['model']!r} is a LoRA adapter: serve its base model "
                                                  f"{base!r} (its adapters are served with it, by name)"))
            continue
        if (s.get("task") or "generate") != "generate":
            continue  # adapters are served by the model's generate services only
        mine = [a for a in adapters.values() if a["adapter"].get("base") == s.get("model")]
        limit = s.get("max_lora_rank")
        for a in mine:
            bad = rank_problem(int(a["adapter"].get("rank") or 0), limit if isinstance(limit, int) else None)
            if bad and limit is not None:
                out.append((("services", j, "max_lora_rank"), f"adapter {a.get('name')!r}: {bad}"))
            if a.get("name") == (s.get("served_model_name") or s.get("name")):
                out.append((("services", j), f"adapter {a.get('name')!r} has the name the service serves its "
                                             "base model as: rename one of them"))
    return out
