"""Unpack, activate, roll back and uninstall bundles on the target.

Layout (target paths; with ``--root DIR`` everything lands under DIR instead and nothing runs)::

    /opt/llm/envs/<env>/<content_hash[:16]>/     unpacked env, conda-unpack run there, .llm-installed.json
    /opt/llm/models/<model>/<commit>/             model files (real files)
    /opt/llm/hf-cache/hub/models--org--name/      HF cache view: snapshots/<sha>/* -> real files, refs/main
    /opt/llm/runtime/<sha[:16]>/, current         the installer's Python (kept for rollback/uninstall/status)
    /opt/llm/installer/<sha[:16]>/, current       the installer package + install.sh
    /usr/local/sbin/llm-install                   wrapper: the installed install.sh without the bundle's disk
    /var/lib/llm/state.json, lock, bundles/<id>/  records (installer.state), a copy of each MANIFEST.json

Every environment and model directory is built beside its final place (``.<name>.partial-XXXX``) and
renamed when complete and verified, so an interrupted install leaves only partial directories, which the
next run removes. The state file is the commit point: a version becomes active only when everything it
needs is in place and its units are written; the previous version stays installed for ``rollback``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from installer import state as st
from installer.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, check_relpath
from installer.errors import BundleError, InstallError, IntegrityError, PreflightError
from installer.extract import DEFAULT_WORKERS, copy_verified, extract_archive
from installer.sizes import human_size

INSTALL_DIR = "/opt/llm"
ENVS = f"{INSTALL_DIR}/envs"
MODELS = f"{INSTALL_DIR}/models"
HF_HUB = f"{INSTALL_DIR}/hf-cache/hub"
RUNTIMES = f"{INSTALL_DIR}/runtime"
INSTALLERS = f"{INSTALL_DIR}/installer"
WRAPPER = "/usr/local/sbin/llm-install"
BUNDLE_RECORDS = f"/{st.STATE_DIR}/bundles"
ENV_MARKER = ".llm-installed.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Say = Callable[[str], None]


def _safe_name(value: str, what: str) -> str:
    if not _NAME_RE.match(str(value)) or ".." in str(value):
        raise BundleError(
            f"unsafe {what} {value!r} in {MANIFEST_NAME}",
            hint="the manifest was not produced by `pack build`; do not install this bundle",
        )
    return str(value)


def bundle_id(bundle: Bundle) -> str:
    return (
        f"{_safe_name(bundle.name, 'bundle name')}-{_safe_name(bundle.version, 'version')}-"
        f"{bundle.manifest_sha256[:12]}"
    )


def env_dir(env: Mapping) -> str:
    h = str(env.get("content_hash") or "")
    if not re.fullmatch(r"[0-9a-f]{16,64}", h):
        raise BundleError(f"environment {env.get('name')!r}: missing or malformed content_hash")
    return f"{ENVS}/{_safe_name(env['name'], 'environment name')}/{h[:16]}"


def model_version(model: Mapping) -> str:
    commit = model.get("commit")
    if commit:
        return _safe_name(str(commit), "model commit")
    files = json.dumps(sorted((f["path"], f["sha256"]) for f in model.get("files", [])))
    return "local-" + hashlib.sha256(files.encode()).hexdigest()[:16]


def model_dir(model: Mapping) -> str:
    return f"{MODELS}/{_safe_name(model['name'], 'model name')}/{model_version(model)}"


def hf_repo_dir(repo: str) -> str:
    org, _, name = str(repo).partition("/")
    if not name:
        org, name = "", org
    folder = "models--" + "--".join(p for p in (org, name) if p)
    return f"{HF_HUB}/{_safe_name(folder, 'repo id')}"


@dataclass
class Target:
    """Maps target paths (what the server sees) to host paths (under ``--root``)."""

    root: Path

    @property
    def live(self) -> bool:
        return self.root.resolve() == Path("/")

    def host(self, target: str) -> Path:
        return self.root / str(target).lstrip("/")


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


class Installer:
    """One run of the installer against ``root`` (holds the state while the lock is held)."""

    def __init__(self, root: Path, say: Say = print) -> None:
        self.t = Target(Path(root))
        self.say = say
        self.state = st.load_state(self.t.root)

    # ------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        st.save_state(self.t.root, self.state)

    def mkdir(self, target: str) -> Path:
        """mkdir -p, recording every directory this creates (uninstall removes them again if empty)."""
        missing = []
        p = self.t.host(target)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            rel = "/" + d.relative_to(self.t.root).as_posix()
            if rel not in self.state["dirs"]:
                self.state["dirs"].append(rel)
        return self.t.host(target)

    def own(self, target: str, kind: str, user: str) -> None:
        obj = self.state["objects"].setdefault(target, {"kind": kind, "users": []})
        if user not in obj["users"]:
            obj["users"].append(user)

    def use(self, target: str, user: str) -> None:
        """Add ``user`` to an object the installer created (pre-existing things are never taken over)."""
        obj = self.state["objects"].get(target)
        if obj is not None and user not in obj["users"]:
            obj["users"].append(user)

    def release(self, user: str) -> list[str]:
        """Drop ``user`` from every object; delete the objects nobody uses any more. Returns those deleted."""
        gone = []
        for target, obj in sorted(self.state["objects"].items(), key=lambda kv: -len(kv[0])):
            if user in obj["users"]:
                obj["users"].remove(user)
            if not obj["users"]:
                _remove(self.t.host(target))
                del self.state["objects"][target]
                gone.append(target)
        self.prune_dirs()
        return gone

    def prune_dirs(self) -> None:
        for d in sorted(self.state["dirs"], key=len, reverse=True):
            p = self.t.host(d)
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
            if not p.exists():
                self.state["dirs"].remove(d)

    def clean_partials(self) -> None:
        """Remove what an interrupted install left: partial dirs, envs without their completion marker."""
        for base in (ENVS, MODELS, RUNTIMES, INSTALLERS):
            top = self.t.host(base)
            if not top.is_dir():
                continue
            for d in list(top.glob(".*.partial-*")) + list(top.glob("*/.*.partial-*")):
                self.say(f"removing {d.name} left by an interrupted install")
                shutil.rmtree(d, ignore_errors=True)
        envs = self.t.host(ENVS)
        if envs.is_dir():
            for d in envs.glob("*/*"):
                if d.is_dir() and not d.name.startswith(".") and not (d / ENV_MARKER).exists():
                    self.say(f"removing incomplete environment {d} (interrupted before it was finished)")
                    shutil.rmtree(d, ignore_errors=True)

    def stored_manifest(self, bid: str) -> dict:
        p = self.t.host(f"{BUNDLE_RECORDS}/{bid}/{MANIFEST_NAME}")
        try:
            return json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise InstallError(
                f"the record of installed bundle {bid} is missing or damaged ({p}: {e})"
            ) from e

    def line_of(self, name: str | None) -> tuple[str, dict]:
        lines = self.state["lines"]
        if name is None:
            if len(lines) == 1:
                name = next(iter(lines))
            elif not lines:
                raise InstallError("nothing is installed here", hint="install a bundle with install.sh first")
            else:
                raise InstallError(
                    f"several bundles are installed ({', '.join(sorted(lines))})",
                    hint="say which one with --name NAME",
                )
        if name not in lines:
            raise InstallError(
                f"no bundle named {name!r} is installed",
                hint=f"installed: {', '.join(sorted(lines)) or 'none'}",
            )
        return name, lines[name]

    # ------------------------------------------------------------------ environments and models
    def env_complete(self, target: str) -> bool:
        return (self.t.host(target) / ENV_MARKER).is_file()

    def install_env(self, bundle: Bundle, env: Mapping, bid: str, workers: int) -> str:
        target = env_dir(env)
        final = self.t.host(target)
        if self.env_complete(target):
            self.use(target, bid)
            self.say(f"environment {env['name']}: already installed at {target} (reused)")
            return target
        if final.exists():  # renamed but conda-unpack/marker never finished: redo it
            shutil.rmtree(final)
        art = bundle.artifact(str(env["artifact"]))
        parent = self.mkdir(str(Path(target).parent))
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
        self.say(f"environment {env['name']}: verifying and unpacking {art.path} ({human_size(art.size)})")
        try:
            res = extract_archive(
                bundle.path_of(art),
                partial,
                expected_sha256=art.sha256,
                expected_size=art.size,
                display_name=art.path,
                workers=workers,
            )
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.chmod(partial, 0o755)
        os.rename(partial, final)
        self.own(target, "tree", bid)
        self.save()  # from here on uninstall knows the directory, even if conda-unpack fails
        self.say(
            f"environment {env['name']}: {res.members} files in {res.seconds:.1f} s; running conda-unpack"
        )
        run_conda_unpack(final, target)
        marker = {
            "environment": env["name"],
            "content_hash": env["content_hash"],
            "artifact_sha256": art.sha256,
            "installed_by": bid,
        }
        _write_atomic(final / ENV_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
        return target

    def install_model(self, bundle: Bundle, model: Mapping, bid: str, workers: int) -> str:
        target = model_dir(model)
        final = self.t.host(target)
        files = list(model.get("files") or [])
        if final.is_dir() and _model_intact(final, files):
            self.use(target, bid)
            self.say(f"model {model['name']}: already installed at {target} (reused)")
            return target
        if final.exists():
            shutil.rmtree(final)
        src_dir = str(model.get("dir") or f"models/{model['name']}")
        arts = [
            (f, bundle.artifact(f"{src_dir}/{check_relpath(f['path'], what='model file')}")) for f in files
        ]
        total = sum(a.size for _, a in arts)
        parent = self.mkdir(str(Path(target).parent))
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
        self.say(f"model {model['name']}: verifying and copying {len(arts)} files ({human_size(total)})")
        try:
            for f, _ in arts:
                (partial / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                jobs = [
                    pool.submit(
                        copy_verified,
                        bundle.path_of(a),
                        partial / f["path"],
                        expected_sha256=a.sha256,
                        expected_size=a.size,
                        display_name=a.path,
                    )
                    for f, a in sorted(arts, key=lambda fa: -fa[1].size)
                ]
                for j in jobs:
                    j.result()
            for d in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o755)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self.own(target, "tree", bid)
        return target

    def hf_view(self, model: Mapping, mdir: str, bid: str) -> str:
        """``models--org--name/snapshots/<sha>/<file>``: relative links to the real files. Returns the dir."""
        repo = model.get("repo") or model["name"]
        rdir = hf_repo_dir(repo)
        snap = f"{rdir}/snapshots/{model_version(model)}"
        host_snap = self.t.host(snap)
        if not host_snap.is_dir():
            self.mkdir(f"{rdir}/snapshots")
            tmp = Path(tempfile.mkdtemp(prefix=f".{host_snap.name}.partial-", dir=host_snap.parent))
            for f in model.get("files") or []:
                link = tmp / f["path"]
                link.parent.mkdir(parents=True, exist_ok=True)
                real = self.t.host(f"{mdir}/{f['path']}")
                rel = os.path.relpath(real, host_snap / Path(f["path"]).parent)
                os.symlink(rel, link)
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink())]:
                os.chmod(d, 0o755)
            os.rename(tmp, host_snap)
            self.own(snap, "tree", bid)
        else:
            self.use(snap, bid)
        return rdir

    def set_ref(self, rdir: str, commit: str, line: str) -> None:
        refs = self.mkdir(f"{rdir}/refs")
        _write_atomic(refs / "main", commit)
        self.own(f"{rdir}/refs/main", "file", f"line:{line}")

    # ------------------------------------------------------------------ bootstrap copy
    def keep_bootstrap(self, bundle: Bundle, bootstrap: Path, bid: str) -> None:
        """Keep the verified runtime, installer and install.sh so rollback/uninstall/status work later."""
        m = bundle.manifest
        runtime = m.get("runtime") or None
        boot = self.state["bootstrap"]
        if runtime and (bootstrap / "runtime").is_dir():
            sha = bundle.artifact(runtime["artifact"]).sha256[:16]
            tgt = f"{RUNTIMES}/{sha}"
            if not self.t.host(tgt).is_dir():
                _copy_tree(bootstrap / "runtime", self.t.host(tgt), self.mkdir(RUNTIMES))
                self.own(tgt, "tree", bid)
            else:
                self.use(tgt, bid)
            _relink(self.t.host(f"{RUNTIMES}/current"), sha)
            self.own(f"{RUNTIMES}/current", "file", "bootstrap")
            boot["runtime"] = tgt
            boot["python"] = runtime.get("python")
        inst_art = (m.get("installer") or {}).get("artifact")
        if inst_art and (bootstrap / "installer").is_dir():
            sha = bundle.artifact(inst_art).sha256[:16]
            tgt = f"{INSTALLERS}/{sha}"
            if not self.t.host(tgt).is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=f".{sha}.partial-", dir=self.mkdir(INSTALLERS)))
                shutil.copytree(
                    bootstrap / "installer" / "installer",
                    tmp / "installer",
                    symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
                sh = bundle.path_of("install.sh")
                if sh.is_file():
                    shutil.copy2(sh, tmp / "install.sh")
                    os.chmod(tmp / "install.sh", 0o755)
                os.chmod(tmp, 0o755)
                os.rename(tmp, self.t.host(tgt))
                self.own(tgt, "tree", bid)
            else:
                self.use(tgt, bid)
            _relink(self.t.host(f"{INSTALLERS}/current"), sha)
            self.own(f"{INSTALLERS}/current", "file", "bootstrap")
            boot["installer"] = tgt
        if boot.get("runtime") and boot.get("installer"):
            self.mkdir(str(Path(WRAPPER).parent))
            _write_atomic(self.t.host(WRAPPER), wrapper_text(), mode=0o755)
            self.own(WRAPPER, "file", "bootstrap")
            boot["wrapper"] = WRAPPER


# --------------------------------------------------------------------------- the commands


def install(bundle: Bundle, opts: InstallOptions, say: Say = print) -> dict:
    """Install and activate ``bundle``; returns a summary record (also printed as it goes)."""
    _quick_check(bundle)
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
    if active == bid and _intact(inst, bid, m):
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
    _write_atomic(host_rec / MANIFEST_NAME, bundle.manifest_bytes)
    sig = bundle.root / SIGNATURE_NAME
    if sig.is_file():
        _write_atomic(host_rec / SIGNATURE_NAME, sig.read_bytes())
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
    _activate(inst, name, bid, m, rec, say)
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


def _activate(inst: Installer, name: str, bid: str, m: Mapping, rec: Mapping, say: Say) -> None:
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
                _activate(
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


def rollback(
    root: Path,
    name: str | None = None,
    *,
    dry_run: bool = False,
    lock_timeout: float = 60.0,
    say: Say = print,
) -> dict:
    """Make the previous version of a bundle active again (the current one becomes 'previous')."""
    with st.Lock(Path(root), lock_timeout) if not dry_run else _nolock():
        inst = Installer(Path(root), say)
        name, line = inst.line_of(name)
        prev, cur = line.get("previous"), line.get("active")
        if not prev or prev not in inst.state["bundles"]:
            raise InstallError(
                f"{name}: there is no previous version to roll back to",
                hint="only the version before the last install is kept",
            )
        m = inst.stored_manifest(prev)
        if not _intact(inst, prev, m):
            raise InstallError(
                f"{name}: the files of the previous version {prev} are incomplete",
                hint="install that bundle again instead",
            )
        pv, cv = inst.state["bundles"][prev]["version"], inst.state["bundles"][cur]["version"]
        say(f"rollback {name}: {cv} -> {pv}")
        if dry_run:
            say("dry run: nothing was changed")
            return {"bundle": name, "from": cur, "to": prev, "result": "dry-run"}
        rec = inst.state["bundles"][prev]
        _activate(inst, name, prev, m, rec, say)
        inst.state["lines"][name]["previous"] = cur
        inst.save()
        from installer import systemd

        restarted = systemd.restart_instances(rec.get("services") or [], root=inst.t.root)
        if restarted:
            say(f"restarted: {', '.join(restarted)}")
        say(f"{name} {pv} is active again ({cv} kept as previous)")
        return {"bundle": name, "from": cur, "to": prev, "result": "rolled-back", "restarted": restarted}


def uninstall(
    root: Path,
    name: str | None = None,
    *,
    dry_run: bool = False,
    lock_timeout: float = 60.0,
    say: Say = print,
) -> dict:
    """Remove exactly what the installer created: one bundle line (``name``) or everything."""
    root = Path(root)
    if not st.state_path(root).exists():
        say("nothing is installed here (no /var/lib/llm/state.json): nothing to do")
        return {"result": "nothing-installed"}
    with st.Lock(root, lock_timeout) if not dry_run else _nolock():
        inst = Installer(root, say)
        names = [inst.line_of(name)[0]] if name else sorted(inst.state["lines"])
        everything = set(names) == set(inst.state["lines"])
        if dry_run:
            say(
                f"would remove: {', '.join(names) or '(no bundles)'}"
                + ("; and the installer's runtime, records and directories" if everything else "")
            )
            return {"result": "dry-run", "lines": names}
        from installer import systemd

        for n in names:
            line = inst.state["lines"][n]
            if line.get("instances"):
                systemd.remove_units(root, line["instances"])
            for f in line.get("unit_files") or []:
                if not any(
                    f in (o.get("unit_files") or []) for k, o in inst.state["lines"].items() if k != n
                ):
                    _remove(inst.t.host(f))
            for bid, rec in list(inst.state["bundles"].items()):
                if rec.get("name") == n:
                    inst.release(bid)
                    del inst.state["bundles"][bid]
            inst.release(f"line:{n}")
            del inst.state["lines"][n]
            say(f"removed {n}")
            inst.save()
        if everything:
            inst.clean_partials()
            inst.release("bootstrap")
            for target in list(inst.state["objects"]):  # anything left over (should be nothing)
                _remove(inst.t.host(target))
            inst.state["objects"] = {}
            if inst.state.get("user_created"):
                systemd.remove_user(root)
            else:
                (root / systemd.SYSUSERS_CONF).unlink(missing_ok=True)
            for stale in (f"{BUNDLE_RECORDS}",):
                _remove(inst.t.host(stale))
            st.state_path(root).unlink(missing_ok=True)
            (root / st.STATE_DIR / st.LOCK_FILE).unlink(missing_ok=True)
            inst.prune_dirs()
            systemd.daemon_reload(root) if inst.t.live and systemd.systemd_running() else None
            say("uninstalled: every file and directory the installer created is gone")
        return {"result": "uninstalled", "lines": names}


def status(root: Path) -> dict:
    """Installed bundles (active, previous) and their instances (version, port, health)."""
    root = Path(root)
    inst = Installer(root, lambda s: None)
    lines = []
    version_of: dict[str, str] = {}
    for n, line in sorted(inst.state["lines"].items()):
        b = inst.state["bundles"]
        act, prev = b.get(line.get("active") or ""), b.get(line.get("previous") or "")
        lines.append(
            {
                "bundle": n,
                "active": act and act["version"],
                "active_id": line.get("active"),
                "previous": prev and prev["version"],
                "previous_id": line.get("previous"),
                "instances": line.get("instances") or [],
            }
        )
        for i in line.get("instances") or []:
            version_of[i] = act["version"] if act else None
    from installer import health

    rows = health.instance_status(root, sorted(version_of), version_of=version_of.get) if version_of else []
    return {"root": str(root), "bundles": lines, "instances": rows}


def format_status(s: Mapping) -> str:
    from installer import health

    if not s["bundles"]:
        return f"nothing installed under {s['root']}"
    out = [
        f"{b['bundle']}: active {b['active']}" + (f", previous {b['previous']}" if b["previous"] else "")
        for b in s["bundles"]
    ]
    if s["instances"]:
        out += ["", health.format_status(s["instances"])]
    return "\n".join(out)


# --------------------------------------------------------------------------- helpers


def _plan(inst: Installer, bundle: Bundle, bid: str, active: str | None) -> Plan:
    m = bundle.manifest
    plan = Plan(bid)
    for env in m.get("environments") or []:
        tgt = env_dir(env)
        plan.add("reuse" if inst.env_complete(tgt) else "unpack", f"environment {env['name']} -> {tgt}")
    for model in m.get("models") or []:
        tgt = model_dir(model)
        ok = inst.t.host(tgt).is_dir() and _model_intact(inst.t.host(tgt), model.get("files") or [])
        plan.add("reuse" if ok else "copy", f"model {model['name']} -> {tgt}")
    for s in m.get("services") or []:
        plan.add("unit", f"llm@{s['name']} (port {s.get('port')})")
    plan.add("switch", f"active: {active or 'none'} -> {bid}")
    return plan


def _quick_check(bundle: Bundle) -> None:
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


def _intact(inst: Installer, bid: str, m: Mapping) -> bool:
    rec = inst.state["bundles"].get(bid)
    if not rec or rec.get("status") != "installed":
        return False
    for env in m.get("environments") or []:
        if not inst.env_complete(env_dir(env)):
            return False
    for model in m.get("models") or []:
        d = inst.t.host(model_dir(model))
        if not d.is_dir() or not _model_intact(d, model.get("files") or []):
            return False
    return True


def _model_intact(d: Path, files: list) -> bool:
    """Every file present with its size (the hash was checked when it was copied here)."""
    for f in files:
        p = d / f["path"]
        try:
            if p.stat().st_size != int(f["size"]):
                return False
        except OSError:
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


def run_conda_unpack(host_prefix: Path, target_prefix: str) -> None:
    """Run the env's ``conda-unpack`` with the env's own python so the prefix baked in is ``target_prefix``.

    On a live server both are the same path and conda-pack's script runs as it is. In a staging tree
    (``--root``) the files are under the root, but the env will run at ``target_prefix`` on the booted
    image: the script's own records and replacement function are used with that prefix.
    """
    script = host_prefix / "bin" / "conda-unpack"
    if not script.is_file():
        return  # packed for a fixed destination: nothing to relocate
    py = host_prefix / "bin" / "python"
    if not py.exists():
        raise InstallError(f"{host_prefix}: the environment has no bin/python to run conda-unpack with")
    env = {"PATH": f"{host_prefix}/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    if str(host_prefix) == target_prefix:
        cmd = [str(py), str(script)]
    else:
        code = (
            "import os, sys\n"
            "script, new_prefix, actual = sys.argv[1:4]\n"
            "sys.path.insert(0, os.path.dirname(script))\n"
            "g = {'__name__': 'conda_unpack_as_library', '__file__': script}\n"
            "exec(compile(open(script).read(), script, 'exec'), g)\n"
            "for path, placeholder, mode in g['_prefix_records']:\n"
            "    g['update_prefix'](os.path.join(actual, path), new_prefix, placeholder, mode=mode)\n"
        )
        cmd = [str(py), "-c", code, str(script), target_prefix, str(host_prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=host_prefix, check=False)
    if r.returncode != 0:
        raise InstallError(
            f"conda-unpack failed in {host_prefix} (exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip()[-2000:]}",
            hint="the environment's python cannot run on this server? see the message above",
        )


def wrapper_text() -> str:
    return f"""#!/bin/bash
# llm-install: rollback, uninstall and status of LLM bundles after the bundle's disk is gone.
# Written by install.sh; runs the installed copy of install.sh (which uses the installed runtime).
set -eu
exec bash {INSTALLERS}/current/install.sh "$@"
"""


def _copy_tree(src: Path, dst: Path, parent: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=parent))
    try:
        shutil.copytree(src, tmp / "t", symlinks=True)
        os.rename(tmp / "t", dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def with_bundle_root(bundle: Bundle, root: Path) -> Bundle:
    """The verified manifest (a private copy) read against the bundle's files at ``root``."""
    return dataclasses.replace(bundle, root=Path(root))
