"""After an install: roll back to the previous version, uninstall exactly what was created, report status."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

from installer import fsutil
from installer.deploy import state as st
from installer.deploy.installed import intact
from installer.deploy.layout import BUNDLE_RECORDS, LINES, STAGING, UNIT_VERSIONS, Say
from installer.deploy.placement import Installer
from installer.deploy.switch import activate_version
from installer.errors import InstallError


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
        if not dry_run:
            inst.recover()
        name, line = inst.line_of(name)
        prev, cur = line.get("previous"), line.get("active")
        if not prev or prev not in inst.state["bundles"]:
            raise InstallError(
                f"{name}: there is no previous version to roll back to",
                hint="only the version before the last install is kept",
            )
        m = inst.stored_manifest(prev)
        if not intact(inst, prev, m):
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
        activate_version(inst, name, prev, m, rec, say)  # one atomic switch; `cur` becomes previous
        from installer import service as systemd
        from installer.deploy.switch import units_for

        restarted = systemd.restart_instances(units_for(m, rec.get("services") or []), root=inst.t.root)
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
        if not dry_run:
            inst.recover()
        names = [inst.line_of(name)[0]] if name else sorted(inst.state["lines"])
        everything = set(names) == set(inst.state["lines"])
        if dry_run:
            say(
                f"would remove: {', '.join(names) or '(no bundles)'}"
                + ("; and the installer's runtime, records and directories" if everything else "")
            )
            return {"result": "dry-run", "lines": names}
        from installer import service as systemd

        def files_of(n: str) -> set[str]:
            out = set(inst.state["lines"].get(n, {}).get("unit_files") or [])
            for rec in inst.state["bundles"].values():
                if rec.get("name") == n:
                    out |= set(rec.get("unit_files") or [])
            return out

        key_files: set[str] = set()  # the operator's API key files: the service user stays while it owns one
        for bid in inst.state["bundles"]:
            with contextlib.suppress(InstallError):
                for s in inst.stored_manifest(bid).get("services") or []:
                    if s.get("api_key_file"):
                        key_files.add(str(s["api_key_file"]))
        for n in names:
            line = inst.state["lines"][n]
            if line.get("instances"):
                systemd.remove_units(root, line["instances"])
            others = set().union(*(files_of(k) for k in inst.state["lines"] if k != n))
            for f in sorted(files_of(n) - others):
                fsutil.remove_path(inst.t.host(f))
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
                fsutil.remove_path(inst.t.host(target))
            inst.state["objects"] = {}
            if inst.state.get("user_created"):
                remove, why = systemd.user_removal_decision(root, sorted(key_files))
                if remove:
                    systemd.remove_user(root, referenced=sorted(key_files))
                else:
                    say(why)
            else:
                (root / systemd.SYSUSERS_CONF).unlink(missing_ok=True)
            for rec in inst.state["bundles"].values():  # committed but never switched to (a crash)
                for f in rec.get("unit_files") or []:
                    fsutil.remove_path(inst.t.host(f))
            for stale in (BUNDLE_RECORDS, STAGING, LINES, UNIT_VERSIONS):
                fsutil.remove_path(inst.t.host(stale))
            st.state_path(root).unlink(missing_ok=True)
            (root / st.STATE_DIR / st.LOCK_FILE).unlink(missing_ok=True)
            inst.prune_dirs()
            systemd.daemon_reload(root) if inst.t.live and systemd.systemd_running() else None
            say("uninstalled: every file and directory the installer created is gone")
        return {"result": "uninstalled", "lines": names}


def clean(root: Path, *, lock_timeout: float = 60.0, say: Say = print) -> dict:
    """Remove the staging tree a refused or interrupted install kept (``llm-install --clean``); first undo
    what an install killed before its commit left under /opt/llm and /etc."""
    root = Path(root)
    staging = root / STAGING.lstrip("/")
    if not staging.exists():
        say(f"nothing to clean ({staging} does not exist)")
        return {"result": "nothing-to-clean"}
    with st.Lock(root, lock_timeout):
        inst = Installer(root, say)
        inst.recover()
        inst.clean_partials()
        inst.remove_staging()
        say(f"removed {staging}")
    if not st.state_path(root).exists():  # nothing installed: the dirs the refused run made go too
        from installer.deploy.install import CREATED_DIRS

        created = root / CREATED_DIRS.lstrip("/")
        try:
            dirs = json.loads(created.read_bytes())
        except (OSError, ValueError):
            dirs = []
        created.unlink(missing_ok=True)
        (root / st.STATE_DIR / st.LOCK_FILE).unlink(missing_ok=True)
        for d in sorted(dirs, key=len, reverse=True):
            with contextlib.suppress(OSError):
                (root / str(d).lstrip("/")).rmdir()
    return {"result": "cleaned", "removed": str(staging)}


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
    from installer.service import health

    rows = health.instance_status(root, sorted(version_of), version_of=version_of.get) if version_of else []
    return {"root": str(root), "bundles": lines, "instances": rows}


def format_status(s: Mapping) -> str:
    from installer.service import health

    if not s["bundles"]:
        return f"nothing installed under {s['root']}"
    out = [
        f"{b['bundle']}: active {b['active']}" + (f", previous {b['previous']}" if b["previous"] else "")
        for b in s["bundles"]
    ]
    if s["instances"]:
        out += ["", health.format_status(s["instances"])]
    return "\n".join(out)


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
