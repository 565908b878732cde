"""Install a verified bundle: preflight, plan, place everything beside what is serving, then switch.

The state file is the commit point: a version becomes active only when everything it needs is in place and
its units are written; the previous version stays installed for rollback (:mod:`installer.lifecycle`). A
failed activation restores the units of the version that was active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from installer import state as st
from installer.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle
from installer.errors import BundleError, InstallError, IntegrityError, PreflightError
from installer.extract import DEFAULT_WORKERS
from installer.layout import (
    BUNDLE_RECORDS,
    HF_HUB,
    INSTALL_DIR,
    Say,
    Target,
    bundle_id,
    env_dir,
    model_dir,
    model_version,
)
from installer.placement import Installer, model_intact, write_atomic


@dataclass
class InstallOptions:
    root: Path = Path("/")
    signed_by: str = "unknown"
    dry_run: bool = False
    allow_downgrade: bool = False
    enable: bool = False
    start: bool = False
    skip_checks: tuple[str, ...] = ()
    lock_timeout: float = 60.0
    bootstrap: Path | None = None  # install.sh's private dir: runtime/ and installer/ it extracted
    health_timeout: float = 900.0
    workers: int = DEFAULT_WORKERS
    json: bool = False


@dataclass
class Plan:
    bundle_id: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (action, what)

    def add(self, action: str, what: str) -> None:
        self.steps.append((action, what))

    def render(self) -> str:
        w = max((len(a) for a, _ in self.steps), default=0)
        return "\n".join(f"  {a.ljust(w)}  {what}" for a, what in self.steps)


def install(bundle: Bundle, opts: InstallOptions, say: Say = print) -> dict:
    """Install and activate ``bundle``; returns a summary record (also printed as it goes)."""
    quick_check(bundle)
    bid = bundle_id(bundle)
    t = Target(Path(opts.root))
    if opts.dry_run:
        inst = Installer(t.root, say)
        return _install_locked(inst, bundle, bid, opts, say)
    t.root.mkdir(parents=True, exist_ok=True)
    new_dirs = _missing_dirs(t, "/" + st.STATE_DIR)
    with st.Lock(t.root, opts.lock_timeout):
        try:
            inst = Installer(t.root, say)
            for d in new_dirs:
                if d not in inst.state["dirs"]:
                    inst.state["dirs"].append(d)
            return _install_locked(inst, bundle, bid, opts, say)
        finally:
            if not st.state_path(t.root).exists():  # refused before changing anything: leave no trace
                (t.root / st.STATE_DIR / st.LOCK_FILE).unlink(missing_ok=True)
                for d in sorted(new_dirs, key=len, reverse=True):
                    with contextlib.suppress(OSError):
                        t.host(d).rmdir()


def _missing_dirs(t: Target, target: str) -> list[str]:
    out = []
    p = Path(target)
    while str(p) != "/" and not t.host(str(p)).exists():
        out.append(str(p))
        p = p.parent
    return out


def _install_locked(inst: Installer, bundle: Bundle, bid: str, opts: InstallOptions, say: Say) -> dict:
    m = bundle.manifest
    name = bundle.name
    line = inst.state["lines"].get(name) or {}
    active = line.get("active")
    summary = {
        "bundle": name,
        "version": bundle.version,
        "id": bid,
        "root": str(inst.t.root),
        "changed": False,
    }
    if active == bid and intact(inst, bid, m):
        say(f"{name} {bundle.version} is already installed and active: nothing changed")
        summary["result"] = "unchanged"
        return summary
    if active and active != bid:
        cur = inst.state["bundles"][active]["version"]
        if st.compare_versions(bundle.version, cur) < 0 and not opts.allow_downgrade:
            raise InstallError(
                f"{name} {bundle.version} is older than the installed {cur}",
                hint="to go back on purpose, add --allow-downgrade (or use --rollback to return "
                "to the previous version)",
            )
    # preflight: nothing is changed before it passes
    from installer import preflight

    owned = _owned_ports(inst)
    results = preflight.run_preflight(
        with_installed_envs(inst, m),
        root=inst.t.root,
        skip=opts.skip_checks,
        owned_ports=owned,
        install_dir=inst.t.host(INSTALL_DIR),
    )
    say(preflight.render_table(results))
    if any(r.status == "FAIL" for r in results):
        raise PreflightError(
            "preflight failed: nothing was changed",
            hint="fix the FAIL lines above (or skip a check on purpose with --skip-check NAME)",
        )
    plan = _plan(inst, bundle, bid, active)
    say(f"plan for {name} {bundle.version} ({bid}) under {inst.t.root}:\n{plan.render()}")
    if opts.dry_run:
        say("dry run: nothing was changed")
        summary["result"] = "dry-run"
        summary["plan"] = plan.steps
        return summary

    # 1. everything the new version needs, beside what is serving now
    inst.clean_partials()
    rec = inst.state["bundles"].setdefault(bid, {})
    rec.update(
        {
            "name": name,
            "version": bundle.version,
            "manifest_sha256": bundle.manifest_sha256,
            "status": rec.get("status", "installing"),
            "signed_by": opts.signed_by,
            "installed_at": rec.get("installed_at") or _now(),
            "envs": {},
            "models": {},
        }
    )
    rec_dir = f"{BUNDLE_RECORDS}/{bid}"
    host_rec = inst.mkdir(rec_dir)
    write_atomic(host_rec / MANIFEST_NAME, bundle.manifest_bytes)
    sig = bundle.root / SIGNATURE_NAME
    if sig.is_file():
        write_atomic(host_rec / SIGNATURE_NAME, sig.read_bytes())
    inst.own(rec_dir, "tree", bid)
    inst.save()
    for env in m.get("environments") or []:
        rec["envs"][env["name"]] = inst.install_env(bundle, env, bid, opts.workers)
        inst.save()
    for svc in m.get("services") or []:  # environments installed before (a model-only bundle uses them)
        en = svc.get("environment")
        if en and en not in rec["envs"]:
            path, meta = _installed_env(inst, en)
            rec["envs"][en] = path
            rec.setdefault("env_meta", {})[en] = meta
            inst.use(path, bid)
    hub_dirs: dict[str, str] = {}
    by_repo = {s["model"] for s in m.get("services") or [] if s.get("serve_by") == "repo_id"}
    for model in m.get("models") or []:
        mdir = inst.install_model(bundle, model, bid, opts.workers)
        rec["models"][model["name"]] = mdir
        if model["name"] in by_repo:
            hub_dirs[model["name"]] = inst.hf_view(model, mdir, bid)
        inst.save()
    if opts.bootstrap is not None:
        inst.keep_bootstrap(bundle, Path(opts.bootstrap), bid)
        inst.save()
    rec["services"] = [s["name"] for s in m.get("services") or []]
    rec["hf_views"] = hub_dirs

    # 2. switch: units, refs, then the state file (the commit point)
    prev_line = dict(line)
    activate_version(inst, name, bid, m, rec, say)
    line = inst.state["lines"][name]
    if active and active != bid:
        line["previous"] = active
    rec["status"] = "installed"
    inst.save()
    summary["changed"] = True
    summary["result"] = "installed"
    pruned = _prune(inst, name)
    if pruned:
        say(f"removed older version(s) no longer needed: {', '.join(pruned)}")
        inst.save()
    say(
        f"{name} {bundle.version} is active"
        + (
            f" (previous: {prev_line.get('active')}, `install.sh --rollback` returns to it)"
            if active and active != bid
            else ""
        )
    )
    summary["services"] = _after_switch(inst, m, rec["services"], opts, say)
    return summary


def activate_version(inst: Installer, name: str, bid: str, m: Mapping, rec: Mapping, say: Say) -> None:
    """Write the units of ``bid`` and point the HF refs at it; on failure restore the active version's."""
    from installer import systemd

    line = inst.state["lines"].setdefault(
        name, {"active": None, "previous": None, "instances": [], "unit_files": []}
    )
    old_active = line.get("active")
    try:
        dirs_before = _unit_dirs(inst, m)
        if m.get("services"):
            if systemd.ensure_user(inst.t.root) and not inst.state.get("user_created"):
                inst.state["user_created"] = True
            files = systemd.install_units(inst.t.root, m, _resolver(inst, m, rec))
            conf = inst.t.root / systemd.SYSUSERS_CONF
            files = [*files, conf] if conf.exists() else files
            for f in files:
                tgt = "/" + Path(f).relative_to(inst.t.root).as_posix()
                if tgt not in line["unit_files"]:
                    line["unit_files"].append(tgt)
            for d in dirs_before:
                if inst.t.host(d).exists() and d not in inst.state["dirs"]:
                    inst.state["dirs"].append(d)
        dropped = sorted(set(line.get("instances") or []) - set(rec.get("services") or []))
        if dropped:
            systemd.remove_units(inst.t.root, dropped)
            say(f"instances no longer in this version removed: {', '.join(dropped)}")
        for model in m.get("models") or []:
            rdir = (rec.get("hf_views") or {}).get(model["name"])
            if rdir:
                inst.set_ref(rdir, model_version(model), name)
        systemd.daemon_reload(inst.t.root)
    except BaseException:
        if old_active and old_active != bid:
            say("activation failed: restoring the units of the version that was active")
            try:
                activate_version(
                    inst,
                    name,
                    old_active,
                    inst.stored_manifest(old_active),
                    inst.state["bundles"][old_active],
                    say,
                )
            except Exception as e:  # report the original error
                say(f"warning: could not restore the previous units: {e}")
        raise
    line["active"] = bid
    line["instances"] = list(rec.get("services") or [])


def _unit_dirs(inst: Installer, m: Mapping) -> list[str]:
    """Directories the unit writer may create (recorded as ours if they did not exist before)."""
    from installer import systemd

    cands = [systemd.UNIT_DIR, systemd.ENV_DIR, systemd.LAUNCHER.parent, systemd.SYSUSERS_CONF.parent]
    cands += [
        systemd.dropin_path(Path("/"), s["name"]).parent.relative_to("/") for s in m.get("services") or []
    ]
    out = []
    for c in cands:
        p = Path("/") / c
        while str(p) != "/" and not inst.t.host(str(p)).exists():
            out.append(str(p))
            p = p.parent
    return sorted(set(out), key=len)


def _resolver(inst: Installer, m: Mapping, rec: Mapping):
    from installer.systemd import InstancePaths

    envs = {e["name"]: e for e in m.get("environments") or []}
    models = {x["name"]: x for x in m.get("models") or []}

    def resolve(svc: Mapping) -> InstancePaths:
        env_name = svc.get("environment")
        env_meta = (rec.get("env_meta") or {}).get(env_name)
        if env_name in (rec.get("envs") or {}):
            prefix = rec["envs"][env_name]
        else:
            prefix, env_meta = _installed_env(inst, env_name)
        model = models[svc["model"]]
        mdir = rec["models"][svc["model"]]
        if svc.get("serve_by") == "repo_id":
            return InstancePaths(
                Path(prefix),
                str(model.get("repo") or model["name"]),
                Path(HF_HUB),
                env_meta if env_name not in envs else None,
            )
        return InstancePaths(Path(prefix), mdir, None, env_meta if env_name not in envs else None)

    return resolve


def with_installed_envs(inst: Installer, m: Mapping) -> Mapping:
    """The manifest plus the installed environments its services use but it does not carry (model-only
    bundles), so that the preflight judges those services by their real environment."""
    have = {e["name"] for e in m.get("environments") or []}
    extra = []
    for svc in m.get("services") or []:
        name = svc.get("environment")
        if name and name not in have:
            try:
                extra.append(_installed_env(inst, name)[1])
            except InstallError:
                continue  # the preflight reports the unknown environment
            have.add(name)
    return {**m, "environments": [*(m.get("environments") or []), *extra]} if extra else m


def preflight_manifest(root: Path, m: Mapping) -> Mapping:
    return with_installed_envs(Installer(Path(root), lambda s: None), m)


def _installed_env(inst: Installer, env_name: str | None) -> tuple[str, dict]:
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
    raise InstallError(
        f"environment {env_name!r} is neither in this bundle nor installed here",
        hint="install the bundle that carries that environment first",
    )


def _after_switch(
    inst: Installer, m: Mapping, names: list[str], opts: InstallOptions, say: Say
) -> list[dict]:
    from installer import systemd

    out: list[dict] = []
    if not names:
        return out
    if opts.enable:
        systemd.enable(names, root=inst.t.root)
        say(f"enabled: {', '.join(systemd.unit_name(n) for n in names)}")
    if not inst.t.live:
        say(f"staging tree {inst.t.root}: nothing started (start the units after booting the image)")
        return out
    restarted = systemd.restart_instances(names, root=inst.t.root)
    if restarted:
        say(f"restarted on the new version: {', '.join(restarted)}")
    to_check = list(restarted)
    if opts.start:
        rest = [n for n in names if n not in restarted]
        systemd.start(rest, root=inst.t.root)
        to_check += rest
    if to_check:
        from installer import health

        services = {s["name"]: s for s in m.get("services") or []}
        for n in to_check:
            say(f"waiting for {systemd.unit_name(n)} to answer (health, then one completion)...")
            r = health.check_instance(inst.t.root, services[n], timeout=opts.health_timeout)
            say(
                f"{n}: healthy after {r['healthy_s']:.0f} s; completion: {r['completion'].get('content')!r}\n"
                f"try it:\n{r['curl']}"
            )
            out.append({"name": n, **r})
    else:
        say(
            "start the service(s) with: "
            + " ; ".join(f"systemctl start {systemd.unit_name(n)}" for n in names)
        )
    return out


def _plan(inst: Installer, bundle: Bundle, bid: str, active: str | None) -> Plan:
    m = bundle.manifest
    plan = Plan(bid)
    for env in m.get("environments") or []:
        tgt = env_dir(env)
        plan.add("reuse" if inst.env_complete(tgt) else "unpack", f"environment {env['name']} -> {tgt}")
    for model in m.get("models") or []:
        tgt = model_dir(model)
        ok = inst.t.host(tgt).is_dir() and model_intact(inst.t.host(tgt), model.get("files") or [])
        plan.add("reuse" if ok else "copy", f"model {model['name']} -> {tgt}")
    for s in m.get("services") or []:
        plan.add("unit", f"llm@{s['name']} (port {s.get('port')})")
    plan.add("switch", f"active: {active or 'none'} -> {bid}")
    return plan


def quick_check(bundle: Bundle) -> None:
    """Presence, type and size of every artifact and no unlisted files (cheap); hashes are checked while
    each artifact is unpacked or copied."""
    extra = bundle.unlisted_files()
    if extra:
        raise BundleError(
            f"{bundle.root}: file(s) not listed in {MANIFEST_NAME}: {', '.join(extra[:5])}",
            hint="something was added to the bundle after it was built; copy it again",
        )
    for a in bundle.artifacts:
        p = bundle.path_of(a)
        if p.is_symlink() or not p.is_file():
            raise IntegrityError(a.path, expected=f"a file of {a.size} bytes", actual="missing", what="file")
        size = p.stat().st_size
        if size != a.size:
            raise IntegrityError(a.path, expected=str(a.size), actual=str(size), what="size")


def intact(inst: Installer, bid: str, m: Mapping) -> bool:
    rec = inst.state["bundles"].get(bid)
    if not rec or rec.get("status") != "installed":
        return False
    for env in m.get("environments") or []:
        if not inst.env_complete(env_dir(env)):
            return False
    for model in m.get("models") or []:
        d = inst.t.host(model_dir(model))
        if not d.is_dir() or not model_intact(d, model.get("files") or []):
            return False
    return True


def _owned_ports(inst: Installer) -> dict[int, str]:
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
    return ports


def _prune(inst: Installer, name: str) -> list[str]:
    line = inst.state["lines"][name]
    keep = {line.get("active"), line.get("previous")}
    gone = []
    for bid, rec in list(inst.state["bundles"].items()):
        if rec.get("name") == name and bid not in keep and rec.get("status") == "installed":
            inst.release(bid)
            del inst.state["bundles"][bid]
            gone.append(f"{rec['version']} ({bid})")
    return gone


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_bundle_root(bundle: Bundle, root: Path) -> Bundle:
    """The verified manifest (a private copy) read against the bundle's files at ``root``."""
    return dataclasses.replace(bundle, root=Path(root))
