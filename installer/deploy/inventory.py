"""``llm-install --inventory``: what this server holds, from the installer's own records (the state and the
copy of each installed MANIFEST.json), in the form of :mod:`installer.bundle.inventory`."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

from installer.bundle import inventory as fmt
from installer.bundle.names import MANIFEST_NAME
from installer.deploy.layout import BUNDLE_RECORDS, RUNTIMES
from installer.deploy.placement import Installer


def server_inventory(root: Path) -> dict:
    """Every installed bundle version (active first per line), and the environments, models (per file) and
    installer runtimes they use, with where they are. Only what is in place is listed (a directory removed by
    hand is left out), so ``pack build --against`` never leaves out something the server lacks."""
    inst = Installer(Path(root), lambda s: None)
    host = socket.gethostname() if inst.t.live else None
    inv = fmt.empty_inventory("server", host=host, root=str(inst.t.root))
    active = {ln.get("active") for ln in inst.state["lines"].values()}
    order = sorted(inst.state["bundles"].items(),
                   key=lambda kv: (kv[1].get("name") or "", kv[0] not in active, kv[1].get("installed_at") or ""))
    for bid, rec in order:
        if rec.get("status") != "installed":
            continue
        try:
            raw = inst.t.host(f"{BUNDLE_RECORDS}/{bid}/{MANIFEST_NAME}").read_bytes()
            m = json.loads(raw)
        except (OSError, ValueError):
            continue  # a damaged record: its parts are not offered to a delta
        envs = {n: p for n, p in (rec.get("envs") or {}).items() if _env_in_place(inst, p, m, n)}
        models = {n: p for n, p in (rec.get("models") or {}).items() if inst.in_use(p)
                  and inst.t.host(p).is_dir()}
        m = {**m, "environments": [e for e in m.get("environments") or [] if e["name"] in envs],
             "models": [x for x in m.get("models") or [] if x["name"] in models]}
        rt_path = None
        rt = m.get("runtime") or {}
        sha = next((a["sha256"] for a in m.get("artifacts") or [] if a["path"] == rt.get("artifact")), None)
        if sha and inst.in_use(f"{RUNTIMES}/{sha[:16]}") and inst.t.host(f"{RUNTIMES}/{sha[:16]}").is_dir():
            rt_path = f"{RUNTIMES}/{sha[:16]}"
        else:
            m = {**m, "runtime": None}
        fmt.add_manifest(inv, m, hashlib.sha256(raw).hexdigest(), bid=bid, active=bid in active,
                         env_paths=envs, model_paths=models, runtime_path=rt_path)
    return inv


def _env_in_place(inst: Installer, path: str, m: dict, name: str) -> bool:
    env = next((e for e in m.get("environments") or [] if e["name"] == name), None)
    return env is not None and inst.env_placed(path, env)
