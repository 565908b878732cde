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
import shutil
from dataclasses import dataclass
from pathlib import Path

from installer import fsutil
from installer.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, overrides
from installer.deploy import state as st
from installer.deploy.delta import check_delta, describe_base
from installer.deploy.installed import installed_env, intact, owned_ports, with_installed_envs
from installer.deploy.layout import (
    BUNDLE_RECORDS,
    HF_CACHES,
    INSTALL_DIR,
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
from installer.deploy.placement import Installer
from installer.deploy.plan import make_plan, quick_check
from installer.deploy.switch import after_switch, prune_versions, roll_back_failed, switch
from installer.deploy.version_units import prepare_units
from installer.errors import InstallError, LlmPackError, PreflightError
from installer.sizes import human_size
from installer.unpack import DEFAULT_WORKERS

CREATED_DIRS = f"/{st.STATE_DIR}/.created-dirs.json"


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
            if prune_versions(inst, name) or name in inst.reconciled:
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
    # a delta bundle: what it leaves to this server must be here (nothing changes if it is not)
    inst.delta = check_delta(inst, bundle)
    if bundle.provided:
        say(f"delta bundle: {len(bundle.provided)} artifacts ({human_size(bundle.provided_size())}) are taken "
            f"from this server's installed copies (built against {describe_base(m)})")
    # preflight: nothing is changed before it passes
    from installer import preflight

    owned = owned_ports(inst)
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
    plan = make_plan(inst, bundle, bid, active)
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
            elif bundle.artifact(str(env["artifact"])).provided:  # check_delta found it; gone since?
                raise InstallError(f"environment {env['name']}: this delta bundle needs it installed at {tgt}",
                                   hint="install the full bundle (`pack build` without --against)")
            else:
                inst.stage_env(bundle, env, opts.workers, test_compiler="compiler" not in skipped)
                new.append(tgt)
        for svc in m.get("services") or []:  # environments installed before (a model-only bundle uses them)
            en = svc.get("environment")
            if en and en not in rec["envs"]:
                path, meta = installed_env(inst, en)
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
        summary["bytes_read"] = inst.bytes_read
        say(_read_line(bundle, inst.bytes_read))
        if inst.reused:
            summary["reused"] = {"files": dict(inst.reused), "bytes": inst.reused_bytes}
            say(f"took {sum(inst.reused.values())} model files ({human_size(inst.reused_bytes)}) from the copies "
                "installed here, each hashed: " + ", ".join(f"{n} {k}" for k, n in sorted(inst.reused.items())))

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
        if not overrides.is_empty(bundle.overrides):  # this version's per-server service fields
            inst.place_file(f"{host_rec}/{overrides.OVERRIDES_NAME}", overrides.canonical(bundle.overrides or {}))
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
        summary["services"] = after_switch(inst, m, rec["services"], opts, say)
    except LlmPackError as e:
        if not active or active == bid:
            raise
        roll_back_failed(inst, name, bid, old_line, say)
        raise InstallError(
            f"{name} {bundle.version} failed its check after the switch ({e.message}); rolled back: "
            f"{inst.state['bundles'][active]['version']} ({active}) is active again",
            hint=e.hint or "see `journalctl -u llm@<name>` for why the new version did not come up",
        ) from e
    pruned = prune_versions(inst, name)
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


def _read_line(bundle: Bundle, n: int) -> str:
    """How much of the bundle this run read: each environment and model byte once, in place (what is installed
    already or was verified by an earlier run is not read again); install.sh read the bootstrap files."""
    v = bundle.volumes
    where = f"{v.count} volumes in place (nothing joined)" if v is not None else str(bundle.root)
    data = sum(a.size for a in bundle.artifacts if a.kind in ("environment", "model"))
    return f"read {human_size(n)} of the environments and models ({human_size(data)}) from {where}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_bundle_root(bundle: Bundle, root: Path) -> Bundle:
    """The verified manifest (a private copy) read against the bundle's files at ``root``."""
    return dataclasses.replace(bundle, root=Path(root))
