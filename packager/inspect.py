"""`pack inspect`: what a bundle holds and what it needs from the target, as a dict and as text."""

from __future__ import annotations

from pathlib import Path

from installer.bundle import SIGNATURE_NAME, Bundle
from installer.sizes import human_size


def describe(path: Path) -> dict:
    b = Bundle.load(path)
    m = b.manifest
    by_kind: dict[str, int] = {}
    for a in b.artifacts:
        by_kind[a.kind] = by_kind.get(a.kind, 0) + a.size
    envs = [{"name": e["name"], "python": e.get("python"), "cuda": e.get("cuda"),
             "cuda_runtime": e.get("cuda_runtime"), "min_driver": e.get("min_driver"),
             "driver_floor": e.get("driver_floor"), "glibc": e.get("glibc"), "platform": e.get("platform"),
             "archive_size": b.artifact(e["artifact"]).size if e.get("artifact") else None,
             "existing": e.get("existing"), "unpacked_size": e.get("unpacked_size"),
             "vllm": (e.get("vllm") or {}).get("version"),
             "packages": {"conda": len((e.get("lock") or {}).get("conda", [])),
                          "pip": len((e.get("lock") or {}).get("pip", []))},
             "needed_libraries": e.get("needed_libraries", [])}
            for e in m.get("environments", [])]
    models = [{"name": x["name"], "source": x["source"], "repo": x.get("repo"), "revision": x.get("revision"),
               "commit": x["commit"], "files": len(x["files"]), "size": x["size"],
               **({"adapter": x["adapter"]} if x.get("adapter") else {})}
              for x in m.get("models", [])]
    return {"bundle": str(b.root), "name": b.name, "version": b.version, "format_version": m["format_version"],
            "signed": (b.root / SIGNATURE_NAME).exists(), "manifest_sha256": b.manifest_sha256,
            "target": m.get("target"), "environments": envs, "models": models,
            "services": m.get("services", []), "size_by_kind": by_kind, "total_size": b.total_size(),
            "artifacts": len(b.artifacts), "delta": _delta(b)}


def _delta(b: Bundle) -> dict | None:
    """What a delta bundle expects the target to have (None: a full bundle)."""
    if not b.provided:
        return None
    m = b.manifest
    prov = {a.path: a for a in b.provided}
    envs = [{"name": e["name"], "content_hash": e["content_hash"], "archive_sha256": prov[e["artifact"]].sha256,
             "size": prov[e["artifact"]].size}
            for e in m.get("environments") or [] if e.get("artifact") in prov]
    models = []
    for x in m.get("models") or []:
        mine = [a for p, a in prov.items() if p.startswith(f"{x['dir']}/")]
        if mine:
            models.append({"name": x["name"], "commit": x["commit"], "files": len(mine),
                           "of_files": len(x["files"]), "size": sum(a.size for a in mine)})
    rt = (m.get("runtime") or {}).get("artifact")
    d = m.get("delta") or {}
    return {"against": d.get("against"), "base": d.get("base") or [], "provided": len(prov),
            "provided_size": b.provided_size(), "full_size": b.total_size() + b.provided_size(),
            "environments": envs, "models": models,
            "runtime": {"sha256": prov[rt].sha256, "size": prov[rt].size} if rt in prov else None}


def _h(n: int | None) -> str:
    return "?" if n is None else human_size(n)


def render(info: dict) -> str:
    t = info.get("target") or {}
    out = [f"bundle {info['name']} {info['version']}  (format v{info['format_version']}, "
           f"{'signed' if info['signed'] else 'UNSIGNED'}, {info['artifacts']} artifacts, {_h(info['total_size'])})",
           f"  path    {info['bundle']}",
           f"  target  {t.get('platform')} ({t.get('arch')}), glibc >= {t.get('glibc')}"]
    out.append("environments:" if info["environments"] else "environments: none (model-only bundle)")
    for e in info["environments"]:
        cuda = (f"CUDA {e['cuda_runtime']} (driver >= {e['min_driver']}, >= {e['driver_floor']} with "
                "minor-version compatibility)") if e["cuda_runtime"] else "CPU only"
        if e.get("existing"):
            out.append(f"  {e['name']}: the server's existing {e['existing']} (checked at install), {cuda}")
            continue
        out.append(f"  {e['name']}: python {e['python']}, {cuda}, vLLM {e['vllm'] or '-'}, "
                   f"{e['packages']['conda']} conda + {e['packages']['pip']} pip packages, "
                   f"{_h(e['archive_size'])} packed / {_h(e['unpacked_size'])} unpacked")
        if e["needed_libraries"]:
            out.append(f"      needs from the server: {', '.join(e['needed_libraries'])}")
    out.append("models:" if info["models"] else "models: none")
    for x in info["models"]:
        src = x["repo"] or "local directory"
        lora = f", LoRA adapter of {x['adapter']['base']} (rank {x['adapter']['rank']})" if x.get("adapter") else ""
        out.append(f"  {x['name']}: {x['source']} {src} @ {x['revision'] or '-'} -> {x['commit']}, "
                   f"{x['files']} files, {_h(x['size'])}{lora}")
    out.append("services:" if info["services"] else "services: none")
    for s in info["services"]:
        gpus = ",".join(map(str, s.get("gpus") or [])) or "-"
        out.append(f"  llm@{s['name']}: model {s['model']} as {s.get('served_model_name')!r} on "
                   f"{s['host']}:{s['port']}, env {s.get('environment')}, GPUs {gpus}, "
                   f"tp {s.get('tensor_parallel_size')}, max_model_len {s.get('max_model_len') or 'auto'}"
                   + (f", task {s['task']}" + (f" (convert {s['convert']})" if s.get("convert") else "")
                      if s.get("task", "generate") != "generate" else "")
                   + (f", {s['nodes']} nodes over Ray (pp {s.get('pipeline_parallel_size')}, port "
                      f"{(s.get('ray') or {}).get('port', 6379)})" if (s.get("nodes") or 1) > 1 else ""))
    d = info.get("delta")
    if d:
        base = ", ".join(f"{b['name']} {b['version']}" for b in d["base"]) or "?"
        out.append(f"delta: built against {base} ({d['against']}); {d['provided']} artifacts "
                   f"({_h(d['provided_size'])}) must already be on the server (full version: {_h(d['full_size'])})")
        for e in d["environments"]:
            out.append(f"  needs environment {e['name']} (content {e['content_hash'][:16]}, archive sha256 "
                       f"{e['archive_sha256'][:16]}, {_h(e['size'])}) installed")
        for x in d["models"]:
            out.append(f"  needs {x['files']} of the {x['of_files']} files of model {x['name']} ({_h(x['size'])}) "
                       "installed (any installed version with the same sha256)")
        if d["runtime"]:
            out.append(f"  needs the installer runtime {d['runtime']['sha256'][:16]} installed (/opt/llm/runtime)")
    return "\n".join(out)
