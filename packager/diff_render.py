"""`pack diff` for a person: what :func:`packager.diff.diff` found, grouped, compact, sizes readable.

``+`` added, ``-`` removed, ``~`` changed; sections without changes are not printed (their names are listed
once, on the ``unchanged:`` line). Long lists are cut (``... and N more``); ``--json`` has everything.
"""

from __future__ import annotations

from collections.abc import Mapping

from installer.sizes import human_size

MAX_FILES = 12  # per model
MAX_PACKAGES = 30  # per environment and package manager
SIZE_KEYS = ("size", "archive_size")


def _h(n: object) -> str:
    return "?" if n is None else human_size(int(n))  # type: ignore[arg-type]


def _short(v: object) -> str:
    s = "-" if v is None else str(v)
    return s[:12] if len(s) in (40, 64) and all(c in "0123456789abcdef" for c in s) else s


def _val(k: str, v: object) -> str:
    if v is None:
        return "-"
    if k in SIZE_KEYS and isinstance(v, int):
        return _h(v)
    if isinstance(v, list):
        return "[" + " ".join(map(str, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{a}={b}" for a, b in sorted(v.items())) + "}"
    return _short(v)


def _fields(fields: Mapping[str, Mapping], names: Mapping[str, str] | None = None) -> str:
    return ", ".join(f"{(names or {}).get(k, k)} {_val(k, d['a'])} -> {_val(k, d['b'])}" for k, d in fields.items())


def _side(s: Mapping) -> str:
    bundles = s.get("bundles") or []
    what = ", ".join(f"{b['name']} {b['version']}{' (delta)' if b.get('delta') else ''}" for b in bundles) or "nothing"
    if s["kind"] == "inventory" and len(bundles) != 1:
        what = f"inventory ({what})"
    return f"{what} [{s['path']}]"


def _cut(items: list[str], limit: int) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... and {len(items) - limit} more (--json lists all)"]


def _packages(label: str, p: Mapping, conda: bool) -> list[str]:
    def b(x: object) -> str:
        return f" ({x})" if conda and x else ""

    items = [f"~ {c['name']} {c['a']}{b(c.get('a_build'))} -> {c['b']}{b(c.get('b_build'))}"
             if c["a"] != c["b"] or not conda or c.get("a_build") != c.get("b_build")
             else f"~ {c['name']} {c['b']} (rebuilt)" for c in p["changed"]]
    items += [f"+ {x['name']} {x['version']}{b(x.get('build'))}" for x in p["added"]]
    items += [f"- {x['name']} {x['version']}{b(x.get('build'))}" for x in p["removed"]]
    if not items:
        return []
    counts = f"{len(p['changed'])} changed, {len(p['added'])} added, {len(p['removed'])} removed"
    return [f"      {label}: {counts}"] + [f"        {x}" for x in _cut(items, MAX_PACKAGES)]


ARCHIVE_KEYS = ("archive_size", "archive_sha256", "content_hash")
ENV_NAMES = {"vllm_version": "vLLM", "cuda": "CUDA (manifest)", "cuda_runtime": "CUDA runtime",
             "min_driver": "min driver", "archive_size": "archive", "archive_sha256": "sha256",
             "content_hash": "content hash"}


def _environments(e: Mapping) -> list[str]:
    out = []
    for x in e["added"]:
        what = (f"the server's existing {x['existing']}" if x.get("existing") else
                f"python {x['python']}, CUDA {x['cuda_runtime'] or 'none'}, vLLM {x['vllm_version'] or '-'}, "
                f"{x['conda']} conda + {x['pip']} pip packages, {_h(x['archive_size'])}")
        out.append(f"  + {x['name']}: {what}")
    for x in e["removed"]:
        out.append(f"  - {x['name']}: vLLM {x['vllm_version'] or '-'}, {_h(x['archive_size'])}")
    for c in e["changed"]:
        f = c["fields"]
        head = _fields({k: v for k, v in f.items() if k not in ARCHIVE_KEYS}, ENV_NAMES)
        pkgs = any(c[m][k] for m in ("conda", "pip") for k in ("added", "removed", "changed"))
        out.append(f"  ~ {c['name']}: {head or ('packages' if pkgs else 'same packages, archive rebuilt')}")
        archive = _fields({k: v for k, v in f.items() if k in ARCHIVE_KEYS}, ENV_NAMES)
        if archive:
            out.append(f"      {archive}")
        out += _packages("conda", c["conda"], True) + _packages("pip", c["pip"], False)
    return out


def _models(m: Mapping) -> list[str]:
    out = []
    for x in m["added"]:
        out.append(f"  + {x['name']}: {x['source']} {x['repo'] or 'local'} @ {_short(x['commit'])}, "
                   f"{x['files']} files, {_h(x['size'])}")
    for x in m["removed"]:
        out.append(f"  - {x['name']}: {x['source']} {x['repo'] or 'local'} @ {_short(x['commit'])}, "
                   f"{x['files']} files, {_h(x['size'])}")
    for c in m["changed"]:
        f, fl, by = c["fields"], c["files"], c["bytes"]
        fields = _fields({k: v for k, v in f.items() if k != "content_hash"})
        counts = (f"{len(fl['changed'])} changed, {len(fl['added'])} added, {len(fl['removed'])} removed, "
                  f"{fl['unchanged']} unchanged")
        out.append(f"  ~ {c['name']}: {fields + '; ' if fields else ''}files {counts}; "
                   f"{_h(by['a'])} -> {_h(by['b'])}, {_h(by['new'])} new")
        items = [f"~ {x['path']}  {_h(x['a_size'])} -> {_h(x['b_size'])}" for x in fl["changed"]]
        items += [f"+ {x['path']}  {_h(x['size'])}" for x in fl["added"]]
        items += [f"- {x['path']}  {_h(x['size'])}" for x in fl["removed"]]
        out += [f"      {x}" for x in _cut(items, MAX_FILES)]
    return out


def _service_line(s: Mapping) -> str:
    gpus = ",".join(map(str, s.get("gpus") or [])) or "-"
    return (f"model {s.get('model')}, env {s.get('environment')}, {s.get('host')}:{s.get('port')}, GPUs {gpus}, "
            f"tp {s.get('tensor_parallel_size')}")


def _services(s: Mapping) -> list[str]:
    out = [f"  + {x['name']}: {_service_line(x)}" for x in s["added"]]
    out += [f"  - {x['name']}: {_service_line(x)}" for x in s["removed"]]
    out += [f"  ~ {c['name']}: {_fields(c['fields'])}" for c in s["changed"]]
    return out


def _versions_note(section: str, v: Mapping) -> list[str]:
    return [f"  note: {side.upper()} holds {n} versions of {section[:-1]} {name}; the last listed was compared"
            for side, names in v.items() for name, n in names.items()]


def render(d: Mapping) -> str:
    out = [f"A: {_side(d['a'])}", f"B: {_side(d['b'])}"]
    unchanged = []
    for title, fn in (("environments", _environments), ("models", _models), ("services", _services)):
        sec = d[title]
        lines = fn(sec)
        if lines:
            out.append(f"{title}:")
            out += lines
        out += _versions_note(title, sec.get("versions") or {})
        if sec["unchanged"]:
            unchanged.append(f"{title} {', '.join(sec['unchanged'])}")
    if d["identical"]:
        out.append("no changes in environments, models or services")
    elif unchanged:
        out.append("unchanged: " + "; ".join(unchanged))
    a, b = d["a"], d["b"]
    if a.get("size") is not None or b.get("size") is not None:
        grow = ""
        if a.get("size") is not None and b.get("size") is not None:
            diff = b["size"] - a["size"]
            grow = f" ({'+' if diff >= 0 else '-'}{_h(abs(diff))})"
        full = f", {_h(b['full_size'])} with what it leaves to the target" \
            if b.get("full_size") not in (None, b.get("size")) else ""
        out.append(f"size: A {_h(a.get('size'))} in the bundle, B {_h(b.get('size'))}{grow}{full}")
    dl = d["delta"]
    kinds = ", ".join(f"{k} {_h(v)}" for k, v in dl["by_kind"].items()) or "nothing"
    approx = "" if dl["exact"] else " (B is an inventory: install.sh, the installer and the SBOM not counted)"
    out.append(f"delta B against A: {_h(dl['size'])} in {dl['files']} files ({kinds}); "
               f"{_h(dl['left_to_target'])} left to the target{approx}")
    return "\n".join(out)
