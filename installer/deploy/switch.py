"""The switch and what follows it: make a version active (ONE rename of ``/etc/llm/lines/<name>``), restart
and check its instances, switch back when the check fails, prune versions no longer needed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from installer import fsutil
from installer.deploy.layout import LINES, UNIT_VERSIONS, Say
from installer.deploy.placement import Installer
from installer.deploy.version_units import instance_links, prepare_units

if TYPE_CHECKING:
    from installer.deploy.install import InstallOptions


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
        for f, to in instance_links(name, n):
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
            for f, _ in instance_links(name, n):
                fsutil.remove_path(inst.t.host(f))
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


def roll_back_failed(inst: Installer, name: str, bid: str, old_line: Mapping, say: Say) -> None:
    """The new version did not come up: switch back to the one that was active and drop the new one."""
    from installer import service as systemd

    old = old_line["active"]
    say(f"{name}: the new version failed its check: rolling back to {inst.state['bundles'][old]['version']}")
    switch(inst, name, old, say, previous=old_line.get("previous"))
    restarted = systemd.restart_instances(
        units_for(inst.stored_manifest(old), inst.state["bundles"][old].get("services") or []), root=inst.t.root)
    if restarted:
        say(f"restarted on the previous version: {', '.join(restarted)}")
    inst.release(bid)
    del inst.state["bundles"][bid]
    inst.save()


def units_for(m: Mapping, names: list[str]) -> list[str]:
    """The units this server runs for the instances ``names``, in start order: ``llm@<name>`` stands as the
    instance name; a service that spans nodes runs its Ray head before it, or only its Ray worker
    (installer/service/cluster.py)."""
    from installer.bundle.manifest import as_service
    from installer.service import cluster

    services = {s["name"]: s for s in m.get("services") or []}
    return [u for n in names for u in (cluster.units_of(as_service(services[n])) if n in services else [n])]


def after_switch(
    inst: Installer, m: Mapping, names: list[str], opts: InstallOptions, say: Say
) -> list[dict]:
    from installer import service as systemd

    out: list[dict] = []
    if not names:
        return out
    units = units_for(m, names)
    if opts.enable:
        systemd.enable(units, root=inst.t.root)
        say(f"enabled: {', '.join(systemd.unit_name(n) for n in units)}")
    if not inst.t.live:
        say(f"staging tree {inst.t.root}: nothing started (start the units after booting the image)")
        return out
    restarted = systemd.restart_instances(units, root=inst.t.root)
    if restarted:
        say(f"restarted on the new version: {', '.join(restarted)}")
    to_check = list(restarted)
    if opts.start:
        rest = [n for n in units if n not in restarted]
        systemd.start(rest, root=inst.t.root)
        to_check += rest
    if to_check:
        from installer.service import cluster, health

        services = {s["name"]: s for s in m.get("services") or []}
        for n in to_check:
            if n not in services:  # a Ray unit: the worker's is checked (the head's is, through llm@ on it)
                if "-worker@" in n:
                    out.append({"name": n, **cluster.check_worker(inst.t.root, n, say, timeout=opts.health_timeout)})
                continue
            task = services[n].get("task") or "generate"
            what = {"embed": "one embedding", "score": "one score"}.get(task, "one completion")
            say(f"waiting for {systemd.unit_name(n)} to answer (health, then {what})...")
            r = health.check_instance(inst.t.root, services[n], timeout=opts.health_timeout)
            say(
                f"{n}: healthy after {r['healthy_s']:.0f} s; {what.split()[-1]}: {r['completion'].get('content')!r}\n"
                f"try it:\n{r['curl']}"
            )
            out.append({"name": n, **r})
    else:
        say(
            "start the service(s) with: "
            + " ; ".join(f"systemctl start {systemd.unit_name(n)}" for n in names)
        )
    return out


def prune_versions(inst: Installer, name: str) -> list[str]:
    line = inst.state["lines"][name]
    keep = {line.get("active"), line.get("previous")}
    gone = []
    for bid, rec in list(inst.state["bundles"].items()):
        if rec.get("name") == name and bid not in keep and rec.get("status") == "installed":
            inst.release(bid)
            del inst.state["bundles"][bid]
            gone.append(f"{rec['version']} ({bid})")
    return gone
