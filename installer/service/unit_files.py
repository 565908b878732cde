"""Installing the ``llm@.service`` template, the launcher and the per-instance files; the API key file check."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from installer.bundle import manifest as records
from installer.bundle.manifest import Manifest
from installer.errors import InstallError
from installer.fsutil import write_atomic
from installer.service import cluster
from installer.service.dropin import find_nvidia_modprobe, render_devices_dropin, render_key_dropin, uses_credentials
from installer.service.envfile import render_env_file
from installer.service.paths import (
    _NAME_RE,
    CACHE_ROOT,
    ENV_DIR,
    GROUP,
    LAUNCHER,
    MIN_CREDENTIALS_SYSTEMD,
    TEMPLATE,
    UNIT_DIR,
    UNITS_SRC,
    USER,
    InstancePaths,
    as_env,
    cache_dir,
    check_instance_name,
    dropin_path,
    env_file_path,
    key_dropin_path,
    log,
    unit_name,
)
from installer.service.systemctl import systemctl, systemd_running
from installer.service.user import _llm_ids, _nologin


def template_text() -> str:
    return (UNITS_SRC / TEMPLATE).read_text(encoding="utf-8")


def launcher_text() -> str:
    return (UNITS_SRC / LAUNCHER.name).read_text(encoding="utf-8")


def install_units(
    root: Path,
    manifest: Manifest | Mapping,
    resolve_paths: Callable[[Mapping], InstancePaths | tuple],
    *,
    services: Iterable[str] | None = None,
) -> list[Path]:
    """Write the template, the launcher, and each service's env file and drop-ins under ``root``.

    ``manifest`` is the bundle's :class:`~installer.bundle.manifest.Manifest` (or its dict, validated here).
    ``resolve_paths(service)`` returns :class:`InstancePaths` (or a tuple in its order) for a MANIFEST
    ``services[]`` entry (given as a dict): absolute target paths. ``services`` limits the instances
    written (default: all). Every file is replaced atomically; nothing is started. Returns the paths
    written (under ``root``). Run :func:`daemon_reload` afterwards on a live system.
    """
    root = Path(root)
    m = records.as_manifest(manifest)
    wanted = set(services) if services is not None else None
    modprobe = find_nvidia_modprobe(root)
    credentials = uses_credentials(root)
    planned: list[tuple[Path, str, int]] = []
    stale: list[Path] = []
    for svc in m.services:
        if wanted is not None and svc.name not in wanted:
            continue
        f = render_instance(root, m, svc, InstancePaths(*resolve_paths(svc.to_dict())),
                            nvidia_modprobe=modprobe, credentials=credentials)
        planned.append((env_file_path(root, svc.name), f.env_file, 0o644))
        planned.append((dropin_path(root, svc.name), f.devices_dropin, 0o644))
        if f.key_dropin is not None:
            planned.append((key_dropin_path(root, svc.name), f.key_dropin, 0o644))
        else:
            stale.append(key_dropin_path(root, svc.name))
        for problem in f.problems:
            log.warning("service %s: %s", svc.name, problem)
    planned.insert(0, (root / UNIT_DIR / TEMPLATE, template_text(), 0o644))
    planned.insert(1, (root / LAUNCHER, launcher_text(), 0o755))
    for d in (root / ENV_DIR, root / LAUNCHER.parent):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    written = [write_atomic(path, text, mode) for path, text, mode in planned]
    for p in stale:  # a key dropped from the manifest, or a systemd without credentials now
        p.unlink(missing_ok=True)
    return written


@dataclass(frozen=True)
class InstanceFiles:
    """What one instance's configuration is: its env file, device drop-in, API key drop-in (None: no key
    through a credential) and the problems found with its key file."""

    env_file: str
    devices_dropin: str
    key_dropin: str | None
    problems: tuple[str, ...]


def render_instance(root: Path, m: Manifest, svc: records.ServiceRecord, paths: InstancePaths, *,
                    nvidia_modprobe: str | None, credentials: bool) -> InstanceFiles:
    """The text of one instance's files (shared by :func:`install_units` and the installer's per-version
    units); writes nothing."""
    env_meta = m.environment(svc.environment) or paths.env_meta
    if env_meta is None:
        raise InstallError(
            f"service {svc.name}: environment {svc.environment!r} is neither in this "
            "bundle nor installed",
            hint="install a bundle with that environment first",
        )
    env = as_env(env_meta)
    via_credential = credentials and svc.api_key_file is not None
    text = render_env_file(svc, env, env_prefix=paths.env_prefix, model_path=paths.model_path,
                           hf_cache=paths.hf_cache, bundle=m.bundle, key_via_credential=via_credential,
                           root=root, adapters=paths.adapters, cluster=cluster.resolve(svc, m))
    devices = render_devices_dropin(env, nvidia_modprobe=nvidia_modprobe)
    if svc.multi_node and svc.node is not None and svc.node.is_head:
        head = cluster.ray_unit("head", svc.name)
        devices += ("# This node is the head of the service's Ray cluster (docs/multinode.md): starting the API\n"
                    f"# server starts the Ray head first; stopping the head stops it.\n[Unit]\nRequires={head}\n")
    return InstanceFiles(
        env_file=text,
        devices_dropin=devices,
        key_dropin=render_key_dropin(svc) if via_credential else None,
        problems=tuple(check_api_key_file(root, svc.api_key_file, via_credential=credentials)),
    )


def key_install_command(key_file: str, *, via_credential: bool) -> str:
    """How the operator puts the API key in place (before the first install)."""
    if via_credential:
        return f"install -D -m 0600 -o root -g root KEYFILE {key_file}"
    return f"install -D -m 0640 -o root -g {GROUP} KEYFILE {key_file}"


def check_api_key_file(root: Path, key_file: str | None, *, via_credential: bool | None = None) -> list[str]:
    """Problems with an API key file on the target (it is placed there by the operator, never bundled).

    ``via_credential`` (default: :func:`uses_credentials`): systemd reads the file as root
    (``LoadCredential=``), so it must exist and be private, and the service user needs no access. Without
    credentials (systemd < 248) the service user reads the file itself: it must exist and be readable by
    the group ``llm``, which must exist first.
    """
    if not key_file:
        return []
    if via_credential is None:
        via_credential = uses_credentials(root)
    path = Path(root) / str(key_file).lstrip("/")
    try:
        st = path.stat()
    except FileNotFoundError:
        return [
            f"API key file {key_file} does not exist; the service cannot start until it does "
            f"({key_install_command(key_file, via_credential=via_credential)})"
        ]
    except OSError as e:
        return [f"API key file {key_file} cannot be read: {e.strerror}"]
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"API key file {key_file} is not a regular file")
    if st.st_mode & 0o007:
        problems.append(
            f"API key file {key_file} is readable by every user (mode {st.st_mode & 0o777:04o}); "
            f"chmod 0640 {key_file}"
        )
    if st.st_mode & 0o020:
        problems.append(f"API key file {key_file} is writable by its group; chmod 0640 {key_file}")
    if via_credential:
        return problems  # systemd (root) reads it; the service sees only its private copy
    uid, gid = _llm_ids(root)
    if uid is None:
        problems.append(
            f"API key file {key_file} cannot be read by user {USER}: the user does not exist yet, and this "
            f"systemd (< {MIN_CREDENTIALS_SYSTEMD}) has no LoadCredential=; create it first: "
            f"useradd --system --user-group --no-create-home --shell {_nologin(root)} {USER}, then "
            f"chown root:{GROUP} {key_file} && chmod 0640 {key_file}"
        )
        return problems
    readable = (
        (st.st_uid == uid and st.st_mode & 0o400)
        or (st.st_gid == gid and st.st_mode & 0o040)
        or st.st_mode & 0o004
    )
    if uid is not None and not readable:
        problems.append(
            f"API key file {key_file} is not readable by user {USER}; "
            f"chown root:{GROUP} {key_file} && chmod 0640 {key_file}"
        )
    return problems


def installed_instances(root: Path = Path("/")) -> list[str]:
    """Instance names that have an env file in ``/etc/llm``."""
    d = Path(root) / ENV_DIR
    return sorted(p.stem for p in d.glob("*.env") if _NAME_RE.fullmatch(p.stem)) if d.is_dir() else []


def remove_units(root: Path, names: Iterable[str]) -> list[Path]:
    """Stop and disable the instances (live system), delete their env files and drop-ins.

    When no instance is left, the template and the launcher go too. Returns the paths removed.
    """
    root = Path(root)
    names = [check_instance_name(n) for n in names]
    if root == Path("/") and systemd_running() and names:
        systemctl("disable", "--now", *[unit_name(n) for n in names], check=False)
        if (root / UNIT_DIR / cluster.RAY_TEMPLATES["head"]).exists():  # services that spanned nodes
            systemctl("disable", "--now", *cluster.all_ray_units(names), check=False)
    removed: list[Path] = []
    for n in names:
        for p in (env_file_path(root, n), dropin_path(root, n), key_dropin_path(root, n)):
            if p.exists() or p.is_symlink():  # the installer's are links through /etc/llm/lines/: maybe dangling
                p.unlink()
                removed.append(p)
        d = dropin_path(root, n).parent
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
        # the instance's CacheDirectory= (systemd made it for our unit: vLLM's caches), /var/cache/llm/<name>
        cache = root / cache_dir(n).relative_to("/")
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache)
            removed.append(cache)
    cache_root = root / CACHE_ROOT.relative_to("/")
    if cache_root.is_dir() and not any(cache_root.iterdir()):
        cache_root.rmdir()
    if not installed_instances(root):
        for p in (root / UNIT_DIR / TEMPLATE, root / LAUNCHER):
            if p.exists() or p.is_symlink():
                p.unlink()
                removed.append(p)
        for d in (root / ENV_DIR, root / LAUNCHER.parent):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if root == Path("/") and systemd_running():
        systemctl("daemon-reload", check=False)
        systemctl("reset-failed", *[unit_name(n) for n in names], *cluster.all_ray_units(names), check=False)
    return removed
