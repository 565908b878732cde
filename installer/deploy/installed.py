"""What is installed here already: an environment of an installed bundle (a model-only bundle's services
use it), the manifest the preflight judges, whether a version is intact, the ports active versions own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from installer.deploy.layout import env_dir, model_dir
from installer.deploy.placement import Installer
from installer.errors import InstallError


def with_installed_envs(inst: Installer, m: Mapping) -> Mapping:
    """The manifest plus the installed environments its services use but it does not carry (model-only
    bundles), so that the preflight judges those services by their real environment."""
    have = {e["name"] for e in m.get("environments") or []}
    extra = []
    for svc in m.get("services") or []:
        name = svc.get("environment")
        if name and name not in have:
            try:
                extra.append(installed_env(inst, name)[1])
            except InstallError:
                continue  # the preflight reports the unknown environment
            have.add(name)
    return {**m, "environments": [*(m.get("environments") or []), *extra]} if extra else m


def preflight_manifest(root: Path, m: Mapping) -> Mapping:
    return with_installed_envs(Installer(Path(root), lambda s: None), m)


def installed_env(inst: Installer, env_name: str | None) -> tuple[str, dict]:
    """An environment of that name from an installed bundle (a model-only bundle's services use it)."""
    order = [ln.get("active") for ln in inst.state["lines"].values()] + list(inst.state["bundles"])
    for bid in [b for b in order if b]:
        rec = inst.state["bundles"].get(bid) or {}
        path = (rec.get("envs") or {}).get(env_name)
        if path and inst.env_complete(path):
            for e in inst.stored_manifest(bid).get("environments") or []:
                if e["name"] == env_name:
                    return path, e
            meta = (rec.get("env_meta") or {}).get(env_name)
            if meta:
                return path, meta
        elif path:  # the server's own environment, used by an installed bundle
            for e in inst.stored_manifest(bid).get("environments") or []:
                if e["name"] == env_name and e.get("existing") == path and inst.env_placed(path, e):
                    return path, e
    raise InstallError(
        f"environment {env_name!r} is neither in this bundle nor installed here",
        hint="install the bundle that carries that environment first",
    )


def intact(inst: Installer, bid: str, m: Mapping) -> bool:
    """Recorded as installed, every environment and model in place as recorded (hashes, not sizes)."""
    rec = inst.state["bundles"].get(bid)
    if not rec or rec.get("status") != "installed":
        return False
    for env in m.get("environments") or []:
        if not inst.env_placed(env_dir(env), env):
            return False
    return all(inst.model_placed(model_dir(model), model) for model in m.get("models") or [])


def owned_ports(inst: Installer) -> dict[int, str]:
    ports: dict[int, str] = {}
    for line in inst.state["lines"].values():
        act = line.get("active")
        if not act:
            continue
        try:
            m = inst.stored_manifest(act)
        except InstallError:
            continue
        for s in m.get("services") or []:
            ports[int(s["port"])] = s["name"]
            if int(s.get("nodes") or 1) > 1:  # its Ray unit's fixed ports (installer/bundle/manifest/cluster.py)
                from installer.bundle.manifest import RaySettings

                ray = RaySettings(**(s.get("ray") or {}))
                for p in ray.ports(head=True).values():
                    ports[p] = s["name"]
    return ports
