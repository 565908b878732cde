"""One version's unit configuration: the env files and drop-ins of its instances in
``/etc/llm/versions/<id>/``, the shared template and launcher, and the static links through
``/etc/llm/lines/<name>`` (journaled by :class:`~installer.deploy.placement.Installer`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from installer.deploy.installed import installed_env
from installer.deploy.layout import INSTALL_DIR, LINES, UNIT_VERSIONS, Say
from installer.deploy.placement import Installer

LEGACY_HF_HUB = f"{INSTALL_DIR}/hf-cache/hub"  # the shared HF cache of installers before per-bundle views


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
    if any(int(svc.get("nodes") or 1) > 1 for svc in services):  # the Ray units of services that span nodes
        for rel, text, mode in cluster_files():
            inst.place_file(rel, text, mode=mode)
            files.append(rel)
    for svc in services:
        n = systemd.check_instance_name(svc["name"])
        for f, to in instance_links(name, n):
            inst.place_link(f, to)
            files.append(f)
    return files


def cluster_files() -> list[tuple[str, str, int]]:
    """(absolute path, text, mode) of the Ray unit templates, their launcher and the node lister."""
    from installer import service as systemd
    from installer.service import cluster

    out = [("/" + (systemd.UNIT_DIR / t).as_posix(), (systemd.UNITS_SRC / t).read_text(encoding="utf-8"), 0o644)
           for t in cluster.RAY_TEMPLATES.values()]
    for p in (cluster.RAY_LAUNCHER, cluster.RAY_NODES):
        out.append(("/" + p.as_posix(), (systemd.UNITS_SRC / p.name).read_text(encoding="utf-8"), 0o755))
    return out


def instance_links(line: str, n: str) -> list[tuple[str, str]]:
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
            prefix, env_meta = installed_env(inst, env_name)
        model = models[svc["model"]]
        mdir = rec["models"][svc["model"]]
        adapters = tuple((a["name"], rec["models"][a["name"]], int(a["adapter"]["rank"]))
                         for a in models.values() if (a.get("adapter") or {}).get("base") == svc["model"]
                         and svc.get("task", "generate") == "generate")
        if svc.get("serve_by") == "repo_id":
            return InstancePaths(
                Path(prefix),
                str(model.get("repo") or model["name"]),
                Path(rec.get("hf_hub") or LEGACY_HF_HUB),
                env_meta if env_name not in envs else None,
                adapters,
            )
        return InstancePaths(Path(prefix), mdir, None, env_meta if env_name not in envs else None, adapters)

    return resolve
