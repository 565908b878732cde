"""What a server holds (or a bundle carries), in one JSON form: the inventory.

``llm-install --inventory --json`` writes it on a server (every installed bundle version, environment, model
with its per-file sha256, and the installer runtimes kept there); ``pack inventory BUNDLE`` writes the same
form for a bundle directory. ``pack build --against`` reads it to leave out of a delta bundle what the target
already has, and ``pack diff`` compares two of them. Standard library only (it runs on the server too).

Shape (``inventory_version`` 1)::

    {"inventory_version": 1,
     "source": {"kind": "server"|"bundle", "host": str|null, "root": str|null, "path": str|null,
                "generated_at": "2026-12-02T06:00:00Z"},
     "bundles": [{"name", "version", "id": str|null, "manifest_sha256", "active": bool,
                  "size": bytes in the bundle, "full_size": bytes with what a delta leaves to the target,
                  "delta": bool, "environments": [names], "models": [names], "services": [MANIFEST services]}],
     "environments": [{"name", "content_hash", "archive_sha256", "archive_size", "path": str|null,
                       "existing": str|null, "python", "cuda", "cuda_runtime", "min_driver", "vllm_version",
                       "lock": {"conda": [...], "pip": [...]}}],
     "models": [{"name", "source", "repo", "revision", "commit", "content_hash", "size", "path": str|null,
                 "files": [{"path", "size", "sha256"}]}],
     "runtimes": [{"artifact", "sha256", "size", "path": str|null}]}

Environments are keyed by (name, content_hash), models by (name, commit): a server holding two versions of a
model lists both.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any

from installer.bundle.names import PROVIDED
from installer.errors import BundleError

INVENTORY_VERSION = 1


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def empty_inventory(kind: str, *, host: str | None = None, root: str | None = None,
                    path: str | None = None) -> dict:
    return {"inventory_version": INVENTORY_VERSION,
            "source": {"kind": kind, "host": host, "root": root, "path": path, "generated_at": now_utc()},
            "bundles": [], "environments": [], "models": [], "runtimes": []}


def _artifacts(manifest: Mapping) -> dict[str, Mapping]:
    return {str(a["path"]): a for a in manifest.get("artifacts") or []}


def bundle_entry(manifest: Mapping, manifest_sha256: str, *, bid: str | None = None,
                 active: bool = False) -> dict:
    arts = list(manifest.get("artifacts") or [])
    b = manifest.get("bundle") or {}
    return {
        "name": b.get("name"), "version": b.get("version"), "id": bid, "manifest_sha256": manifest_sha256,
        "active": active,
        "size": sum(int(a["size"]) for a in arts if a.get("provided") != PROVIDED),
        "full_size": sum(int(a["size"]) for a in arts),
        "delta": any(a.get("provided") == PROVIDED for a in arts),
        "environments": [e["name"] for e in manifest.get("environments") or []],
        "models": [m["name"] for m in manifest.get("models") or []],
        "services": [dict(s) for s in manifest.get("services") or []],
    }


def environment_entry(env: Mapping, manifest: Mapping, *, path: str | None = None) -> dict:
    art = _artifacts(manifest).get(str(env.get("artifact") or "")) or {}
    lock = env.get("lock") or {}
    return {
        "name": env["name"], "content_hash": env.get("content_hash"),
        "archive_sha256": art.get("sha256"), "archive_size": art.get("size"),
        "path": path, "existing": env.get("existing"),
        "python": env.get("python"), "cuda": env.get("cuda"), "cuda_runtime": env.get("cuda_runtime"),
        "min_driver": env.get("min_driver"), "vllm_version": (env.get("vllm") or {}).get("version"),
        "lock": {"conda": [dict(x) for x in lock.get("conda") or []],
                 "pip": [dict(x) for x in lock.get("pip") or []]},
    }


def model_entry(model: Mapping, *, path: str | None = None) -> dict:
    files = [{"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])}
             for f in model.get("files") or []]
    return {
        "name": model["name"], "source": model.get("source"), "repo": model.get("repo"),
        "revision": model.get("revision"), "commit": model.get("commit"),
        "content_hash": model.get("content_hash"), "size": sum(f["size"] for f in files), "path": path,
        "files": sorted(files, key=lambda f: f["path"]),
    }


def runtime_entry(manifest: Mapping, *, path: str | None = None) -> dict | None:
    rt = manifest.get("runtime") or None
    if not rt:
        return None
    art = _artifacts(manifest).get(str(rt.get("artifact"))) or {}
    if not art:
        return None
    return {"artifact": art["path"], "sha256": art["sha256"], "size": art["size"], "path": path}


def add_manifest(inv: dict, manifest: Mapping, manifest_sha256: str, *, bid: str | None = None,
                 active: bool = False, env_paths: Mapping[str, str] | None = None,
                 model_paths: Mapping[str, str] | None = None, runtime_path: str | None = None) -> dict:
    """Add one bundle (a MANIFEST dict) to ``inv``: its entry, and its environments, models and runtime where
    they are not listed yet. Returns ``inv``."""
    inv["bundles"].append(bundle_entry(manifest, manifest_sha256, bid=bid, active=active))
    have_env = {(e["name"], e["content_hash"]) for e in inv["environments"]}
    for env in manifest.get("environments") or []:
        if (env["name"], env.get("content_hash")) not in have_env:
            inv["environments"].append(environment_entry(env, manifest,
                                                          path=(env_paths or {}).get(env["name"])))
            have_env.add((env["name"], env.get("content_hash")))
    have_model = {(m["name"], m["commit"]) for m in inv["models"]}
    for model in manifest.get("models") or []:
        if (model["name"], model.get("commit")) not in have_model:
            inv["models"].append(model_entry(model, path=(model_paths or {}).get(model["name"])))
            have_model.add((model["name"], model.get("commit")))
    rt = runtime_entry(manifest, path=runtime_path)
    if rt is not None and rt["sha256"] not in {r["sha256"] for r in inv["runtimes"]}:
        inv["runtimes"].append(rt)
    return inv


def from_manifest(manifest: Mapping, manifest_sha256: str, *, path: str | None = None) -> dict:
    """The inventory of one bundle (``pack inventory BUNDLE``)."""
    inv = empty_inventory("bundle", path=path)
    return add_manifest(inv, manifest, manifest_sha256, active=True)


def load_inventory(data: bytes | str, *, source: str = "inventory") -> dict:
    """Parse and check an inventory JSON document (the fields :func:`provided_sets` and ``pack diff`` use)."""
    try:
        inv = json.loads(data)
    except ValueError as e:
        raise BundleError(f"{source}: not valid JSON ({e})",
                          hint="write it with `llm-install --inventory --json > FILE` on the server") from e
    if not isinstance(inv, dict) or inv.get("inventory_version") != INVENTORY_VERSION:
        found = inv.get("inventory_version") if isinstance(inv, dict) else type(inv).__name__
        raise BundleError(f"{source}: not an inventory of version {INVENTORY_VERSION} (inventory_version: "
                          f"{found!r})",
                          hint="write it with `llm-install --inventory --json > FILE` on the server, or "
                          "`pack inventory BUNDLE --json`")
    for key in ("bundles", "environments", "models", "runtimes"):
        if not isinstance(inv.get(key), list) or not all(isinstance(x, dict) for x in inv[key]):
            raise BundleError(f"{source}: {key} must be a list of objects")
    for i, m in enumerate(inv["models"]):
        for j, f in enumerate(m.get("files") or []):
            if not _sha(f.get("sha256")) or not isinstance(f.get("size"), int) or isinstance(f.get("size"), bool):
                raise BundleError(f"{source}: models[{i}].files[{j}]: needs a sha256 (64 hex) and a size")
    for key in ("environments", "runtimes"):
        for i, x in enumerate(inv[key]):
            sha = x.get("archive_sha256" if key == "environments" else "sha256")
            if sha is not None and not _sha(sha):
                raise BundleError(f"{source}: {key}[{i}]: malformed sha256 {sha!r}")
    return inv


def _sha(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def provided_sets(inventories: Iterable[Mapping]) -> dict[str, set]:
    """What the target has, by sha256: ``{"environment": {archive sha}, "model": {file sha},
    "runtime": {archive sha}}`` (the artifacts a delta may leave out)."""
    out: dict[str, set] = {"environment": set(), "model": set(), "runtime": set()}
    for inv in inventories:
        for e in inv.get("environments") or []:
            if e.get("archive_sha256") and not e.get("existing"):
                out["environment"].add(e["archive_sha256"])
        for m in inv.get("models") or []:
            out["model"].update(f["sha256"] for f in m.get("files") or [])
        for r in inv.get("runtimes") or []:
            if r.get("sha256"):
                out["runtime"].add(r["sha256"])
    return out


def render(inv: Mapping) -> str:
    """The inventory for a person: bundles, environments, models (files counted, not listed)."""
    from installer.sizes import human_size

    lines = []
    src = inv.get("source") or {}
    where = src.get("host") or src.get("path") or src.get("root") or ""
    lines.append(f"inventory of {src.get('kind', '?')} {where}".rstrip())
    lines.append("bundles:")
    for b in inv.get("bundles") or []:
        mark = "*" if b.get("active") else " "
        delta = " (delta)" if b.get("delta") else ""
        lines.append(f" {mark} {b['name']} {b['version']}{delta}  {b.get('id') or ''}".rstrip())
    if not inv.get("bundles"):
        lines.append("   none")
    lines.append("environments:")
    for e in inv.get("environments") or []:
        what = f"existing {e['existing']}" if e.get("existing") else \
            f"content {str(e.get('content_hash'))[:16]} archive sha256 {str(e.get('archive_sha256'))[:16]}"
        vllm = f" vLLM {e['vllm_version']}" if e.get("vllm_version") else ""
        cuda = f" CUDA {e['cuda_runtime']}" if e.get("cuda_runtime") else ""
        lines.append(f"   {e['name']}: {what}{vllm}{cuda}")
    lines.append("models:")
    for m in inv.get("models") or []:
        src_ = f"{m.get('source')} {m.get('repo')}" if m.get("repo") else str(m.get("source"))
        lines.append(f"   {m['name']}: {src_} @ {m.get('commit')}  {len(m.get('files') or [])} files, "
                     f"{human_size(int(m.get('size') or 0))}")
    if inv.get("runtimes"):
        lines.append("installer runtimes: " + ", ".join(r["sha256"][:16] for r in inv["runtimes"]))
    return "\n".join(lines)
