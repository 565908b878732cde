"""`pack diff A B`: what changed from A to B, for a change review and for scripts.

A and B are each a bundle directory (or split volume 1: only its MANIFEST.json is read), a MANIFEST.json file
or an inventory JSON (``llm-install --inventory --json``, ``pack inventory BUNDLE --json``), told apart by
their content. Both are normalised into the inventory form (:mod:`installer.bundle.inventory`) and compared:
models, environments and services by name, bundle size, and the size of a delta built from B against A (the
artifacts of B whose sha256 A does not have, :func:`installer.bundle.inventory.provided_sets`). The JSON
(``DIFF_VERSION`` 1) is documented in docs/bundle-format.md; :mod:`packager.diff_render` prints it for people.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from installer.bundle import inventory as inv_mod
from installer.bundle.names import MANIFEST_NAME, PROVIDABLE_KINDS, SPLIT_INFO
from installer.errors import UsageError
from packager.env.facts import canonical

DIFF_VERSION = 1
MAX_JSON_FILE = 256 << 20
ENV_FIELDS = ("vllm_version", "python", "cuda", "cuda_runtime", "min_driver", "existing", "archive_size",
              "archive_sha256", "content_hash")
MODEL_FIELDS = ("source", "repo", "revision", "commit", "content_hash")
KINDS = "a bundle directory (or split volume 1), a MANIFEST.json or an inventory JSON"


@dataclass(frozen=True)
class Side:
    """One side of the comparison: where it came from, its inventory, and its MANIFEST when it has one."""

    label: str
    kind: str  # "bundle" | "manifest" | "inventory"
    inventory: dict
    manifest: dict | None = None


def load_side(path: str | Path) -> Side:
    """Read ``path`` as a bundle directory, a MANIFEST.json or an inventory JSON (by content)."""
    from installer.bundle.manifest import Manifest

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory", hint=f"pass {KINDS}")
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            hint = ("split volumes: pass the first one (the one holding MANIFEST.json)"
                    if (p / SPLIT_INFO).exists() else f"pass {KINDS}")
            raise UsageError(f"{p}: a directory without {MANIFEST_NAME}: not a bundle", hint=hint)
        p = p / MANIFEST_NAME
        kind = "bundle"
    else:
        kind = ""
    if not p.is_file():  # a FIFO or a device would be read forever
        raise UsageError(f"{p}: not a regular file", hint=f"pass {KINDS}")
    if p.stat().st_size > MAX_JSON_FILE:
        raise UsageError(f"{p}: {p.stat().st_size} bytes: too large for a MANIFEST.json or an inventory",
                         hint=f"pass {KINDS}")
    data = p.read_bytes()
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
        raise UsageError(f"{path}: neither a bundle, a MANIFEST.json nor an inventory ({why})",
                         hint=f"pass {KINDS}") from e
    label = str(path)
    if isinstance(obj, dict) and "inventory_version" in obj:
        if obj.get("inventory_version") == inv_mod.INVENTORY_VERSION:
            check_inventory(obj, label)  # first: what load_inventory reads too, named by field
        return Side(label, "inventory", inv_mod.load_inventory(data, source=label))
    if isinstance(obj, dict) and "format_version" in obj and "bundle" in obj:
        records = Manifest.from_json(data, source=str(p))
        sha = hashlib.sha256(data).hexdigest()
        raw = dict(records.raw)
        check_inventory({"environments": raw.get("environments") or []}, str(p))  # the locks are free-form JSON
        return Side(label, kind or "manifest", inv_mod.from_manifest(raw, sha, path=label), raw)
    found = ", ".join(sorted(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
    raise UsageError(f"{path}: neither a bundle, a MANIFEST.json nor an inventory (JSON with {found or 'nothing'})",
                     hint=f"pass {KINDS}: a MANIFEST.json has format_version and bundle, an inventory "
                     "inventory_version")


def check_inventory(inv: Mapping, label: str) -> None:
    """Refuse, naming the field, what the comparison reads and an inventory lacks (a hand-edited file)."""
    def fail(where: str, what: str) -> NoReturn:
        raise UsageError(f"{label}: {where}: {what}",
                         hint="write it with `llm-install --inventory --json` (or `pack inventory BUNDLE --json`)")

    def size(x: Mapping, key: str, where: str) -> None:
        v = x.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            fail(f"{where}.{key}", f"a size in bytes, not {v!r}")

    def items(x: Mapping, key: str) -> list:
        v = x.get(key)
        return v if isinstance(v, list) else []  # not a list: load_inventory says so

    def named(x: object, where: str) -> Mapping:
        if not isinstance(x, dict) or not isinstance(x.get("name"), str):
            fail(where, "needs a name (a string)")
        return x

    for i, b in enumerate(items(inv, "bundles")):
        if not isinstance(b, dict):
            fail(f"bundles[{i}]", "an object")
        size(b, "size", f"bundles[{i}]")
        size(b, "full_size", f"bundles[{i}]")
        svcs = b.get("services") or []
        if not isinstance(svcs, list):
            fail(f"bundles[{i}].services", "a list of services")
        for j, sv in enumerate(svcs):
            named(sv, f"bundles[{i}].services[{j}]")
    for i, e in enumerate(items(inv, "environments")):
        named(e, f"environments[{i}]")
        size(e, "archive_size", f"environments[{i}]")
        lock = e.get("lock") or {}
        if not isinstance(lock, dict):
            fail(f"environments[{i}].lock", "an object with conda and pip lists")
        for mgr in ("conda", "pip"):
            entries = lock.get(mgr) or []
            if not isinstance(entries, list):
                fail(f"environments[{i}].lock.{mgr}", "a list of packages")
            for j, x in enumerate(entries):
                named(x, f"environments[{i}].lock.{mgr}[{j}]")
    for i, m in enumerate(items(inv, "models")):
        named(m, f"models[{i}]")
        size(m, "size", f"models[{i}]")
        files = m.get("files") or []
        if not isinstance(files, list):
            fail(f"models[{i}].files", "a list of files")
        for j, f in enumerate(files):
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                fail(f"models[{i}].files[{j}]", "needs a path (a string)")
    for i, r in enumerate(items(inv, "runtimes")):
        if not isinstance(r, dict):
            fail(f"runtimes[{i}]", "an object")
        size(r, "size", f"runtimes[{i}]")


# --------------------------------------------------------------------------- comparing
def _by_name(items: list[dict], key: str = "name") -> tuple[dict[str, dict], dict[str, int]]:
    """Entries by name (the last listed of a name wins) and how many each name had."""
    out: dict[str, dict] = {}
    count: dict[str, int] = {}
    for x in items:
        out[str(x.get(key))] = x
        count[str(x.get(key))] = count.get(str(x.get(key)), 0) + 1
    return out, count


def _fields(a: Mapping, b: Mapping, keys) -> dict[str, dict]:
    return {k: {"a": a.get(k), "b": b.get(k)} for k in keys if a.get(k) != b.get(k)}


def _packages(a: list[dict], b: list[dict], *, pip: bool) -> dict[str, list]:
    def key(e: Mapping) -> str:
        return canonical(str(e["name"])) if pip else str(e["name"])

    def desc(e: Mapping) -> dict:
        d = {"name": str(e["name"]), "version": e.get("version")}
        if not pip:
            d["build"] = e.get("build")
        return d

    ka = {key(e): e for e in a}
    kb = {key(e): e for e in b}
    changed = []
    for k in sorted(ka.keys() & kb.keys()):
        x, y = ka[k], kb[k]
        same_build = pip or x.get("build") == y.get("build")
        if x.get("version") != y.get("version") or not same_build or x.get("sha256") != y.get("sha256"):
            entry = {"name": str(y["name"]), "a": x.get("version"), "b": y.get("version")}
            if not pip:
                entry |= {"a_build": x.get("build"), "b_build": y.get("build")}
            changed.append(entry)
    return {"added": [desc(kb[k]) for k in sorted(kb.keys() - ka.keys())],
            "removed": [desc(ka[k]) for k in sorted(ka.keys() - kb.keys())], "changed": changed}


def _env_summary(e: Mapping) -> dict:
    lock = e.get("lock") or {}
    return {"name": e["name"], "python": e.get("python"), "cuda_runtime": e.get("cuda_runtime"),
            "min_driver": e.get("min_driver"), "vllm_version": e.get("vllm_version"),
            "existing": e.get("existing"), "archive_size": e.get("archive_size"),
            "conda": len(lock.get("conda") or []), "pip": len(lock.get("pip") or [])}


def _environments(a: dict, b: dict) -> dict:
    (ea, na), (eb, nb) = _by_name(a["environments"]), _by_name(b["environments"])
    changed, unchanged = [], []
    for name in sorted(ea.keys() & eb.keys()):
        x, y = ea[name], eb[name]
        fields = _fields(x, y, ENV_FIELDS)
        lx, ly = x.get("lock") or {}, y.get("lock") or {}
        conda = _packages(lx.get("conda") or [], ly.get("conda") or [], pip=False)
        pip = _packages(lx.get("pip") or [], ly.get("pip") or [], pip=True)
        if fields or any(conda.values()) or any(pip.values()):
            changed.append({"name": name, "fields": fields, "conda": conda, "pip": pip})
        else:
            unchanged.append(name)
    return {"added": [_env_summary(eb[n]) for n in sorted(eb.keys() - ea.keys())],
            "removed": [_env_summary(ea[n]) for n in sorted(ea.keys() - eb.keys())],
            "changed": changed, "unchanged": unchanged, "versions": _versions(na, nb)}


def _versions(na: Mapping[str, int], nb: Mapping[str, int]) -> dict:
    """Names listed more than once on a side (a server holding two versions): the last one was compared."""
    return {side: {k: v for k, v in sorted(n.items()) if v > 1} for side, n in (("a", na), ("b", nb))
            if any(v > 1 for v in n.values())}


def _model_summary(m: Mapping) -> dict:
    return {"name": m["name"], "source": m.get("source"), "repo": m.get("repo"), "commit": m.get("commit"),
            "files": len(m.get("files") or []), "size": int(m.get("size") or 0)}


def _models(a: dict, b: dict) -> dict:
    (ma, na), (mb, nb) = _by_name(a["models"]), _by_name(b["models"])
    changed, unchanged = [], []
    for name in sorted(ma.keys() & mb.keys()):
        x, y = ma[name], mb[name]
        fx = {f["path"]: f for f in x.get("files") or []}
        fy = {f["path"]: f for f in y.get("files") or []}
        added = [{"path": p, "size": fy[p]["size"]} for p in sorted(fy.keys() - fx.keys())]
        removed = [{"path": p, "size": fx[p]["size"]} for p in sorted(fx.keys() - fy.keys())]
        files_changed = [{"path": p, "a_size": fx[p]["size"], "b_size": fy[p]["size"]}
                         for p in sorted(fx.keys() & fy.keys()) if fx[p]["sha256"] != fy[p]["sha256"]]
        fields = _fields(x, y, MODEL_FIELDS)
        if fields or added or removed or files_changed:
            changed.append({
                "name": name, "fields": fields,
                "files": {"added": added, "removed": removed, "changed": files_changed,
                          "unchanged": len(fx.keys() & fy.keys()) - len(files_changed)},
                "bytes": {"a": int(x.get("size") or 0), "b": int(y.get("size") or 0),
                          "new": sum(f["size"] for f in added) + sum(f["b_size"] for f in files_changed)}})
        else:
            unchanged.append(name)
    return {"added": [_model_summary(mb[n]) for n in sorted(mb.keys() - ma.keys())],
            "removed": [_model_summary(ma[n]) for n in sorted(ma.keys() - mb.keys())],
            "changed": changed, "unchanged": unchanged, "versions": _versions(na, nb)}


def _services_of(inv: Mapping) -> dict[str, dict]:
    """The services of the active bundles (all bundles when none is marked active), by name."""
    bundles = inv.get("bundles") or []
    active = [b for b in bundles if b.get("active")] or bundles
    return {str(s.get("name")): dict(s) for b in active for s in b.get("services") or []}


def _services(a: dict, b: dict) -> dict:
    sa, sb = _services_of(a), _services_of(b)
    changed, unchanged = [], []
    for name in sorted(sa.keys() & sb.keys()):
        keys = sorted(sa[name].keys() | sb[name].keys())
        fields = _fields(sa[name], sb[name], [k for k in keys if k != "name"])
        if fields:
            changed.append({"name": name, "fields": fields})
        else:
            unchanged.append(name)
    return {"added": [sb[n] for n in sorted(sb.keys() - sa.keys())],
            "removed": [sa[n] for n in sorted(sa.keys() - sb.keys())], "changed": changed, "unchanged": unchanged}


def _side_info(s: Side) -> dict:
    bundles = s.inventory.get("bundles") or []
    one = bundles[0] if len(bundles) == 1 else None
    return {"path": s.label, "kind": s.kind,
            "bundles": [{"name": x.get("name"), "version": x.get("version"),
                         "manifest_sha256": x.get("manifest_sha256"), "active": bool(x.get("active")),
                         "delta": bool(x.get("delta"))} for x in bundles],
            "size": one.get("size") if one else None, "full_size": one.get("full_size") if one else None}


def _delta(a: Side, b: Side) -> dict:
    """What a delta of B built against A would carry: B's artifacts whose sha256 A lacks (and those a delta
    never leaves out: install.sh, the installer, the SBOM)."""
    have = inv_mod.provided_sets([a.inventory])
    carried: list[dict] = []
    left = 0
    if b.manifest is not None:
        for art in b.manifest.get("artifacts") or []:
            kind, size = str(art.get("kind")), int(art.get("size") or 0)
            if kind in PROVIDABLE_KINDS and art.get("sha256") in have.get(kind, set()):
                left += size
            else:
                carried.append({"path": art["path"], "kind": kind, "size": size})
        exact = True
    else:  # an inventory: its environments, model files and runtimes (the small fixed files are not listed)
        for e in b.inventory["environments"]:
            if e.get("existing") or not e.get("archive_sha256"):
                continue
            size = int(e.get("archive_size") or 0)
            if e["archive_sha256"] in have["environment"]:
                left += size
            else:
                carried.append({"path": f"envs/{e['name']}.tar.zst", "kind": "environment", "size": size})
        for m in b.inventory["models"]:
            for f in m.get("files") or []:
                if f["sha256"] in have["model"]:
                    left += int(f["size"])
                else:
                    carried.append({"path": f"models/{m['name']}/{f['path']}", "kind": "model",
                                    "size": int(f["size"])})
        for r in b.inventory["runtimes"]:
            if r.get("sha256") in have["runtime"]:
                left += int(r.get("size") or 0)
            else:
                carried.append({"path": str(r.get("artifact")), "kind": "runtime", "size": int(r.get("size") or 0)})
        exact = False
    by_kind: dict[str, int] = {}
    for c in carried:
        by_kind[c["kind"]] = by_kind.get(c["kind"], 0) + c["size"]
    return {"size": sum(c["size"] for c in carried), "files": len(carried), "by_kind": dict(sorted(by_kind.items())),
            "left_to_target": left, "exact": exact, "artifacts": sorted(carried, key=lambda c: c["path"])}


def diff(a: Side, b: Side) -> dict:
    """The comparison of A and B (the JSON ``pack diff --json`` prints; keys documented in the docs)."""
    envs = _environments(a.inventory, b.inventory)
    models = _models(a.inventory, b.inventory)
    services = _services(a.inventory, b.inventory)
    same = not any(sec[k] for sec in (envs, models, services) for k in ("added", "removed", "changed"))
    return {"diff_version": DIFF_VERSION, "a": _side_info(a), "b": _side_info(b), "identical": same,
            "environments": envs, "models": models, "services": services, "delta": _delta(a, b)}


def diff_paths(a: str | Path, b: str | Path) -> dict:
    return diff(load_side(a), load_side(b))
