"""Before anything changes: the cheap check of a bundle's files and the plan an install shows (and
``--dry-run`` prints)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from installer.bundle import MANIFEST_NAME, Bundle
from installer.deploy.layout import env_dir, model_dir
from installer.deploy.medium import quick_check_volumes
from installer.deploy.placement import Installer
from installer.deploy.staging import model_intact
from installer.errors import BundleError, IntegrityError


@dataclass
class Plan:
    bundle_id: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (action, what)

    def add(self, action: str, what: str) -> None:
        self.steps.append((action, what))

    def render(self) -> str:
        w = max((len(a) for a, _ in self.steps), default=0)
        return "\n".join(f"  {a.ljust(w)}  {what}" for a, what in self.steps)


def make_plan(inst: Installer, bundle: Bundle, bid: str, active: str | None) -> Plan:
    m = bundle.manifest
    plan = Plan(bid)
    for env in m.get("environments") or []:
        tgt = env_dir(env)
        if env.get("existing"):
            plan.add("use", f"environment {env['name']} -> {tgt} (already on this server)")
            continue
        plan.add("reuse" if inst.env_placed(tgt, env) else "unpack", f"environment {env['name']} -> {tgt}")
    for model in m.get("models") or []:
        tgt = model_dir(model)
        ok = inst.in_use(tgt) and model_intact(inst.t.host(tgt), model.get("files") or [])
        linked = sum(1 for f in model.get("files") or [] if f"{model.get('dir')}/{f['path']}" in inst.delta.files)
        what = f"model {model['name']} -> {tgt}"
        if not ok and linked:
            what += f" ({linked} of {len(model.get('files') or [])} files linked from installed copies)"
        plan.add("reuse" if ok else "copy", what)
    for s in m.get("services") or []:
        plan.add("unit", f"llm@{s['name']} (port {s.get('port')})")
    plan.add("switch", f"active: {active or 'none'} -> {bid}")
    return plan


def quick_check(bundle: Bundle) -> None:
    """Presence, type and size of every artifact and no unlisted files (cheap); hashes are checked while
    each artifact is unpacked or copied. Split volumes: every piece on the volumes mounted now."""
    if bundle.volumes is not None:
        quick_check_volumes(bundle)
        return
    extra = bundle.unlisted_files()
    if extra:
        raise BundleError(
            f"{bundle.root}: file(s) not listed in {MANIFEST_NAME}: {', '.join(extra[:5])}",
            hint="something was added to the bundle after it was built; copy it again",
        )
    for a in bundle.artifacts:
        p = bundle.path_of(a)
        if p.is_symlink() or not p.is_file():
            found = ("a symlink" if p.is_symlink() else "missing" if not os.path.lexists(p)
                     else "not a regular file")
            raise IntegrityError(a.path, expected=f"a file of {a.size} bytes", actual=found, what="file")
        size = p.stat().st_size
        if size != a.size:
            raise IntegrityError(a.path, expected=str(a.size), actual=str(size), what="size")
