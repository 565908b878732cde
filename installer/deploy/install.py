"""Install a verified bundle: preflight, stage and verify everything, place it, commit, then switch.

1. Stage: every environment, model file, HF view and bootstrap copy is prepared and verified under
   ``/var/lib/llm/staging`` (:mod:`installer.deploy.placement`); nothing under ``/opt/llm`` or ``/etc`` changes.
   A refusal here (a bad hash, disk full, Ctrl-C, the medium gone) leaves both as they were.
2. Place: the staged directories are renamed into ``/opt/llm`` and this version's unit configuration is
   written to ``/etc/llm/versions/<id>/`` (journaled: undone at once on failure, or by the next run after a
   crash). Everything is synced.
3. Commit: the state file records the bundle and what it uses. It is not active yet.
4. Switch: ONE rename of the symlink ``/etc/llm/lines/<name>`` -> ``../versions/<id>``. Every instance's
   ``/etc/llm/<instance>.env`` and device drop-in are static links through it, so units and state agree at
   every instant: before the rename the old version is configured, after it the new one (the state's
   ``active`` follows the link: :meth:`Installer.reconcile`). On a live system the instances are restarted
   and checked; a failed check switches back to the previous version (and says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from installer import fsutil
from installer.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle
from installer.deploy import state as st
from installer.deploy.layout import (
    BUNDLE_RECORDS,
    HF_CACHES,
    INSTALL_DIR,
    LINES,
    RUNTIMES,
    STAGING,
    UNIT_VERSIONS,
    WRAPPER,
    Say,
    Target,
    bundle_id,
    env_dir,
    files_digest,
    hf_hub,
    model_dir,
    wrapper_text,
)
from installer.deploy.placement import Installer, model_intact, remove_path
from installer.errors import BundleError, InstallError, IntegrityError, LlmPackError, PreflightError
from installer.unpack import DEFAULT_WORKERS

CREATED_DIRS = f"/{st.STATE_DIR}/.created-dirs.json"
LEGACY_HF_HUB = f"{INSTALL_DIR}/hf-cache/hub"  # the shared HF cache of installers before per-bundle views


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
    created = t.host(CREATED_DIRS)
    with st.Lock(t.root, opts.lock_timeout):
        try:
            if not st.state_path(t.root).exists():
                # which of /var/lib/llm's parents this installer made, remembered until the state records
                # them (a run killed before its first commit made them: the next one must know)
                try:
                    new_dirs = sorted(set(new_dirs) | set(json.loads(created.read_bytes())), key=len)
                except (OSError, ValueError):
                    pass
                fsutil.write_atomic(created, json.dumps(new_dirs) + "\n")
            inst = Installer(t.root, say)
            inst.recover()
            for d in new_dirs:
                if d not in inst.state["dirs"]:
                    inst.state["dirs"].append(d)
            try:
                return _install_locked(inst, bundle, bid, opts, say)
            except OSError as e:
                raise _os_error(inst, e) from e
        finally:
            if st.state_path(t.root).exists():
                created.unlink(missing_ok=True)
            elif not t.host(STAGING).exists():  # refused before changing anything: leave no trace
                created.unlink(missing_ok=True)
                (t.root / st.STATE_DIR / st.LOCK_FILE).unlink(missing_ok=True)
                for d in sorted(new_dirs, key=len, reverse=True):
                    with contextlib.suppress(OSError):
                        t.host(d).rmdir()


def _os_error(inst: Installer, e: OSError) -> InstallError:
    """Disk full, permission denied, the bundle's medium gone...: what, where, how to fix."""
    import errno as _errno

    doing = getattr(inst, "doing", None)
    what = {
        _errno.ENOSPC: "the disk is full",
        _errno.EDQUOT: "the disk quota is exhausted",
        _errno.EACCES: "permission denied",
        _errno.EPERM: "operation not permitted",
        _errno.EROFS: "the filesystem is read-only",
        _errno.ENOENT: "a file disappeared (was the bundle's medium removed?)",
        _errno.EIO: "an I/O error (a failing or removed medium?)",
    }.get(e.errno or 0, e.strerror or type(e).__name__)
    fix = {
        _errno.ENOSPC: "free space there (or on the filesystem of /var/lib/llm) and run the install again",
        _errno.EDQUOT: "free space there and run the install again",
        _errno.ENOENT: "reconnect the bundle's medium (or copy the bundle again) and run the install again",
        _errno.EIO: "check the medium (dmesg), copy the bundle again if needed, and run the install again",
    }.get(e.errno or 0, "fix that and run the install again (as root)")
    where = f"{e.filename}: " if e.filename else ""
    err = InstallError(
        f"install failed{f' while {doing}' if doing else ''}: {what} ({where}{e.strerror or e})", hint=fix
    )
    if getattr(inst, "refused", False):
        _explain_failure(inst, err)
    return err


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
    if active == bid and intact(inst, bid, m) and inst.t.host(f"{UNIT_VERSIONS}/{bid}").is_dir():
        say(f"{name} {bundle.version} is already installed and active: nothing changed")
        if not opts.dry_run:  # finish what a run killed after its switch left undone
            if name in inst.reconciled:
                switch(inst, name, bid, say)
            if _prune(inst, name) or name in inst.reconciled:
                inst.save()
            inst.remove_staging()
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
    skipped = preflight.parse_skip(opts.skip_checks)
    plan = _plan(inst, bundle, bid, active)
    say(f"plan for {name} {bundle.version} ({bid}) under {inst.t.root}:\n{plan.render()}")
    if opts.dry_run:
        say("dry run: nothing was changed")
        summary["result"] = "dry-run"
        summary["plan"] = plan.steps
        return summary

    # 1. stage and verify everything in /var/lib/llm/staging (nothing under /opt/llm or /etc changes yet)
    inst.clean_partials()
    rec: dict = {
        "name": name,
        "version": bundle.version,
        "manifest_sha256": bundle.manifest_sha256,
        "status": "installed",
        "signed_by": opts.signed_by,
        "installed_at": (inst.state["bundles"].get(bid) or {}).get("installed_at") or _now(),
        "envs": {},
        "models": {},
    }
    new: list[str] = []  # targets under /opt/llm to rename into place
    try:
        for env in m.get("environments") or []:
            tgt = env_dir(env)
            rec["envs"][env["name"]] = tgt
            if env.get("existing"):  # the server's own: checked by the preflight, never created or removed
                if not inst.env_placed(tgt, env):
                    raise InstallError(f"environment {env['name']}: {tgt}/bin/python is not there",
                                       hint="install vLLM there first, or fix environments[].existing")
                say(f"environment {env['name']}: the server's existing environment {tgt}")
                continue
            if inst.env_placed(tgt, env):
                say(f"environment {env['name']}: already installed at {tgt} (reused)")
            else:
                inst.stage_env(bundle, env, opts.workers, test_compiler="compiler" not in skipped)
                new.append(tgt)
        for svc in m.get("services") or []:  # environments installed before (a model-only bundle uses them)
            en = svc.get("environment")
            if en and en not in rec["envs"]:
                path, meta = _installed_env(inst, en)
                rec["envs"][en] = path
                rec.setdefault("env_meta", {})[en] = meta
        by_repo = {s["model"] for s in m.get("services") or [] if s.get("serve_by") == "repo_id"}
        digests = {}
        hf_views: dict[str, str] = {}
        for model in m.get("models") or []:
            tgt = model_dir(model)
            rec["models"][model["name"]] = tgt
            digests[tgt] = files_digest(list(model.get("files") or []))
            if inst.model_placed(tgt, model):
                say(f"model {model['name']}: already installed at {tgt} (reused)")
            else:
                inst.stage_model(bundle, model, opts.workers)
                new.append(tgt)
            if model["name"] in by_repo:
                hf_views[model["name"]] = inst.stage_hf_view(model, tgt, bid)
        if hf_views:
            new.append(f"{HF_CACHES}/{bid}")
            rec["hf_hub"] = hf_hub(bid)
        rec["hf_views"] = hf_views
        boot = inst.stage_bootstrap(bundle, Path(opts.bootstrap)) if opts.bootstrap is not None else []
        new += [tgt for _, tgt in boot if not inst.in_use(tgt)]
        rec["services"] = [s["name"] for s in m.get("services") or []]
        inst.t.host(STAGING).mkdir(parents=True, exist_ok=True)
        fsutil.sync_fs(inst.t.host(STAGING))

        # 2. everything is verified: rename it into /opt/llm and write this version's units (journaled)
        token = inst.begin(bid)
        for model in m.get("models") or []:
            if model_dir(model) in new:
                inst.finish_staged_model(model)
        for tgt in new:
            inst.promote(tgt)
        host_rec = f"{BUNDLE_RECORDS}/{bid}"
        inst.place_file(f"{host_rec}/{MANIFEST_NAME}", bundle.manifest_bytes)
        if bundle.signature is not None:  # the bytes that were verified, not a second read of the bundle
            inst.place_file(f"{host_rec}/{SIGNATURE_NAME}", bundle.signature)
        rec["unit_files"] = prepare_units(inst, name, bid, m, rec, say)
        if boot and len(boot) == 2:
            inst.place_file(WRAPPER, wrapper_text(), mode=0o755)
        for base in {INSTALL_DIR, "/etc"}:
            if inst.t.host(base).is_dir():
                fsutil.sync_fs(inst.t.host(base))

        # 3. the commit: the bundle and every object it uses are recorded (the switch comes next)
        for tgt in rec["envs"].values():
            inst.own(tgt, "tree", bid) if tgt in new else inst.use(tgt, bid)
        for tgt in rec["models"].values():
            inst.own(tgt, "tree", bid, digest=digests[tgt])
        if hf_views:
            inst.own(f"{HF_CACHES}/{bid}", "tree", bid)
        inst.own(host_rec, "tree", bid)
        inst.own(f"{UNIT_VERSIONS}/{bid}", "tree", bid)
        for _, tgt in boot:
            inst.own(tgt, "tree", bid)
        rec["txn"] = token
        inst.state["bundles"][bid] = rec
        inst.commit()
    except BaseException as e:
        inst.undo()
        inst.refused = True
        _explain_failure(inst, e)
        raise

    # 4. the switch: one symlink, then the state follows it
    if boot:
        b = inst.state["bootstrap"]
        for base, tgt in boot:
            fsutil.replace_symlink(inst.mkdir(base) / "current", Path(tgt).name)
            inst.own(f"{base}/current", "file", "bootstrap")
            b["runtime" if base == RUNTIMES else "installer"] = tgt
        if m.get("runtime"):
            b["python"] = m["runtime"].get("python")
        if len(boot) == 2:
            inst.own(WRAPPER, "file", "bootstrap")
            b["wrapper"] = WRAPPER
    old_line = dict(line)
    switch(inst, name, bid, say)
    summary["changed"] = True
    summary["result"] = "installed"
    say(
        f"{name} {bundle.version} is active"
        + (
            f" (previous: {old_line.get('active')}, `install.sh --rollback` returns to it)"
            if active and active != bid
            else ""
        )
    )
    try:
        summary["services"] = _after_switch(inst, m, rec["services"], opts, say)
    except LlmPackError as e:
        if not active or active == bid:
            raise
        _roll_back_failed(inst, name, bid, old_line, say)
        raise InstallError(
            f"{name} {bundle.version} failed its check after the switch ({e.message}); rolled back: "
            f"{inst.state['bundles'][active]['version']} ({active}) is active again",
            hint=e.hint or "see `journalctl -u llm@<name>` for why the new version did not come up",
        ) from e
    pruned = _prune(inst, name)
    if pruned:
        say(f"removed older version(s) no longer needed: {', '.join(pruned)}")
        inst.save()
    inst.remove_staging()
    return summary


def _explain_failure(inst: Installer, e: BaseException) -> None:
    """Add to the error that nothing changed, and where the verified files wait for a re-run."""
    staging = inst.t.host(STAGING)
    keep = staging.is_dir() and any(
        p.is_file() and "backup" not in p.relative_to(staging).parts for p in staging.rglob("*")
    )
    note = "nothing under /opt/llm or /etc was changed"
    if staging.is_dir() and not any(p.is_file() for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)  # only empty directories: nothing to resume, leave no trace
    if keep:
        note += (f"; what was verified is kept in {staging} for the next run "
                 "(`install.sh --clean` or `llm-install --clean` removes it)")
    if isinstance(e, LlmPackError):
        e.hint = f"{e.hint}; {note}" if e.hint else note
    elif isinstance(e, KeyboardInterrupt):
        inst.say(f"interrupted: {note}")


def prepare_units(inst: Installer, name: str, bid: str, m: Mapping, rec: Mapping, say: Say) -> list[str]:
    """This version's unit configuration in ``/etc/llm/versions/<bid>/``, the shared template and
    launcher, and the static links that reach the active version through ``/etc/llm/lines/<name>``.
    Journaled (undone if the install is refused). Returns the shared files and links written."""
    from installer import service as systemd

    files: list[str] = []
    services = m.get("services") or []
    inst.mkdir(LINES)
    vdir = f"{UNIT_VERSIONS}/{bid}"
    inst.mkdir(vdir)
    if not services:
        return files
    conf = "/" + systemd.SYSUSERS_CONF.as_posix()
    inst.mkdir(str(Path(conf).parent))
    inst._backup_or_create(conf)
    if systemd.ensure_user(inst.t.root):
        inst.journal_user_created()
        inst.state["user_created"] = True
    if inst.t.host(conf).exists():
        files.append(conf)
    for rel, text, mode in _render_units(inst, m, rec, say):
        inst.place_file(f"{vdir}/{rel}", text, mode)
    template = "/" + (systemd.UNIT_DIR / systemd.TEMPLATE).as_posix()
    launcher = "/" + systemd.LAUNCHER.as_posix()
    inst.place_file(template, systemd.template_text())
    inst.place_file(launcher, systemd.launcher_text(), mode=0o755)
    files += [template, launcher, f"{LINES}/{name}"]
    for svc in services:
        n = systemd.check_instance_name(svc["name"])
        for f, to in _instance_links(name, n):
            inst.place_link(f, to)
            files.append(f)
    return files


def _instance_links(line: str, n: str) -> list[tuple[str, str]]:
    """(link, relative target): ``/etc/llm/<n>.env`` and the device drop-in, through the line's switch."""
    from installer import service as systemd

    return [
        ("/" + systemd.env_file_path(Path(""), n).as_posix(), f"lines/{line}/{n}.env"),
        (str(systemd.dropin_path(Path("/"), n)), f"../../../llm/lines/{line}/{n}.{systemd.DROPIN_NAME}"),
        (str(systemd.key_dropin_path(Path("/"), n)), f"../../../llm/lines/{line}/{n}.{systemd.KEY_DROPIN_NAME}"),
    ]


def _render_units(inst: Installer, m: Mapping, rec: Mapping, say: Say) -> list[tuple[str, str, int]]:
    """(file name in the version dir, text, mode) of every instance: env file, device drop-in, API key
    drop-in. Mirrors :func:`installer.service.install_units` (which writes to the live paths instead)."""
    from installer import service as systemd
    from installer.bundle import manifest as records

    man = records.as_manifest(m)
    modprobe = systemd.find_nvidia_modprobe(inst.t.root)
    credentials = systemd.uses_credentials(inst.t.root)
    resolve = _resolver(inst, m, rec)
    out = []
    for svc in man.services:
        f = systemd.render_instance(inst.t.root, man, svc, systemd.InstancePaths(*resolve(svc.to_dict())),
                                    nvidia_modprobe=modprobe, credentials=credentials)
        out.append((f"{svc.name}.env", f.env_file, 0o644))
        out.append((f"{svc.name}.{systemd.DROPIN_NAME}", f.devices_dropin, 0o644))
        key = f.key_dropin or (
            "# Written by the llm-pack installer: this version of the instance has no API key credential.\n")
        out.append((f"{svc.name}.{systemd.KEY_DROPIN_NAME}", key, 0o644))
        for problem in f.problems:
            say(f"warning: service {svc.name}: {problem}")
    return out


def switch(inst: Installer, name: str, bid: str, say: Say, *, previous: str | None = "keep") -> None:
    """Make ``bid`` the active version of line ``name``: ONE rename of the link ``/etc/llm/lines/<name>``
    (every instance's env file and drop-in go through it), then the state follows (a crash in between is
    reconciled from the link when the state is next loaded), then instances the new version dropped go."""
    from installer import service as systemd

    rec = inst.state["bundles"][bid]
    line = inst.state["lines"].setdefault(
        name, {"active": None, "previous": None, "instances": [], "unit_files": []}
    )
    old = line.get("active")
    for n in rec.get("services") or []:  # instances of this version reach it through the line's link
        for f, to in _instance_links(name, n):
            h = inst.t.host(f)
            if not (h.is_symlink() and os.readlink(h) == to):
                h.parent.mkdir(parents=True, exist_ok=True)
                fsutil.replace_symlink(h, to)
    link = inst.mkdir(LINES) / name
    fsutil.replace_symlink(link, f"../versions/{bid}")
    links = inst.t.host("/" + systemd.ENV_DIR.as_posix())
    old_instances = sorted(  # instances reaching this line through their env file link
        p.name[: -len(".env")] for p in (links.glob("*.env") if links.is_dir() else [])
        if p.is_symlink() and os.readlink(p).startswith(f"lines/{name}/")
    )
    if previous != "keep":
        line["previous"] = previous
    elif old and old != bid:
        line["previous"] = old
    line["active"] = bid
    line["instances"] = list(rec.get("services") or [])
    for f in rec.get("unit_files") or []:
        if f not in line["unit_files"]:
            line["unit_files"].append(f)
    inst.save()
    dropped = sorted(set(old_instances) - set(line["instances"]))
    if dropped:
        for n in dropped:
            for f, _ in _instance_links(name, n):
                remove_path(inst.t.host(f))
                if f in line["unit_files"]:
                    line["unit_files"].remove(f)
        systemd.remove_units(inst.t.root, dropped)
        inst.save()
        say(f"instances no longer in this version removed: {', '.join(dropped)}")
    if inst.t.live and systemd.systemd_running():
        systemd.daemon_reload(inst.t.root)


def activate_version(inst: Installer, name: str, bid: str, m: Mapping, rec: Mapping, say: Say) -> None:
    """Switch line ``name`` to the installed ``bid`` (its unit configuration is written first if an older
    installer did not keep one)."""
    if not inst.t.host(f"{UNIT_VERSIONS}/{bid}").is_dir() or not rec.get("unit_files"):
        token = inst.begin(bid)
        try:
            files = prepare_units(inst, name, bid, m, rec, say)
            inst.own(f"{UNIT_VERSIONS}/{bid}", "tree", bid)
            inst.state["bundles"][bid]["unit_files"] = files
            inst.state["bundles"][bid]["txn"] = token
            inst.commit()
        except BaseException:
            inst.undo()
            raise
    switch(inst, name, bid, say)


def _roll_back_failed(inst: Installer, name: str, bid: str, old_line: Mapping, say: Say) -> None:
    """The new version did not come up: switch back to the one that was active and drop the new one."""
    from installer import service as systemd

    old = old_line["active"]
    say(f"{name}: the new version failed its check: rolling back to {inst.state['bundles'][old]['version']}")
    switch(inst, name, old, say, previous=old_line.get("previous"))
    restarted = systemd.restart_instances(inst.state["bundles"][old].get("services") or [], root=inst.t.root)
    if restarted:
        say(f"restarted on the previous version: {', '.join(restarted)}")
    inst.release(bid)
    del inst.state["bundles"][bid]
    inst.save()


def _resolver(inst: Installer, m: Mapping, rec: Mapping):
    from installer.service import InstancePaths

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
                Path(rec.get("hf_hub") or LEGACY_HF_HUB),
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
        elif path:
            for e in inst.stored_manifest(bid).get("environments") or []:
                if e["name"] == env_name and e.get("existing") == path and inst.env_placed(path, e):
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
    from installer import service as systemd

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
        from installer.service import health

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
        if env.get("existing"):
            plan.add("use", f"environment {env['name']} -> {tgt} (already on this server)")
            continue
        plan.add("reuse" if inst.env_placed(tgt, env) else "unpack", f"environment {env['name']} -> {tgt}")
    for model in m.get("models") or []:
        tgt = model_dir(model)
        ok = inst.in_use(tgt) and model_intact(inst.t.host(tgt), model.get("files") or [])
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
            found = ("a symlink" if p.is_symlink() else "missing" if not os.path.lexists(p)
                     else "not a regular file")
            raise IntegrityError(a.path, expected=f"a file of {a.size} bytes", actual=found, what="file")
        size = p.stat().st_size
        if size != a.size:
            raise IntegrityError(a.path, expected=str(a.size), actual=str(size), what="size")


def intact(inst: Installer, bid: str, m: Mapping) -> bool:
    """Recorded as installed, every environment and model in place as recorded (hashes, not sizes)."""
    rec = inst.state["bundles"].get(bid)
    if not rec or rec.get("status") != "installed":
        return False
    for env in m.get("environments") or []:
        if not inst.env_placed(env_dir(env), env):
            return False
    return all(inst.model_placed(model_dir(model), model) for model in m.get("models") or [])


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
