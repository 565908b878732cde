"""Where the installer puts things on the target, and the names it derives from a bundle's manifest.

Target paths (with ``--root DIR`` everything lands under DIR instead and nothing runs)::

    /opt/llm/envs/<env>/<content_hash[:16]>/     unpacked env, conda-unpack run there, .llm-installed.json
    /opt/llm/models/<model>/<commit>/             model files (real files)
    /opt/llm/hf-cache/<bundle id>/hub/models--org--name/   HF cache view of one bundle version:
                                                  snapshots/<sha>/* -> real files, refs/main (never shared)
    /opt/llm/runtime/<sha[:16]>/, current         the installer's Python (kept for rollback/uninstall/status)
    /opt/llm/installer/<sha[:16]>/, current       the installer package + install.sh
    /usr/local/sbin/llm-install                   wrapper: the installed install.sh without the bundle's disk
    /var/lib/llm/state.json, lock, bundles/<id>/  records (installer.deploy.state), a copy of each MANIFEST.json
    /var/lib/llm/staging/                         everything of an install being prepared (same layout as
                                                  /opt/llm), renamed into /opt/llm only once all is verified;
                                                  kept after a failed run for the next one (`--clean`)
    /etc/llm/versions/<id>/<instance>.env, .devices.conf   the unit configuration of one bundle version
    /etc/llm/lines/<bundle name> -> ../versions/<id>        THE switch: one symlink per bundle line
    /etc/llm/<instance>.env -> lines/<bundle name>/<instance>.env         (static links through the switch;
    /etc/systemd/system/llm@<instance>.service.d/devices.conf -> ...       the same for the device drop-in)

Every name taken from a manifest is checked here before it becomes part of a path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from installer.bundle import MANIFEST_NAME, Bundle
from installer.bundle.names import (  # noqa: F401  (layout.X is how the deploy modules name them)
    BUNDLE_RECORDS,
    ENV_MARKER,
    ENVS,
    HF_CACHES,
    INSTALL_DIR,
    INSTALLERS,
    JOURNAL,
    LINES,
    MODELS,
    RUNTIMES,
    STAGING,
    UNIT_VERSIONS,
    WRAPPER,
)
from installer.bundle.overrides import identity_suffix
from installer.errors import BundleError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
Say = Callable[[str], None]


def safe_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(str(value)) or ".." in str(value):
        raise BundleError(
            f"unsafe {what} {value!r} in {MANIFEST_NAME}",
            hint="the manifest was not produced by `pack build`; do not install this bundle",
        )
    return str(value)


def bundle_id(bundle: Bundle) -> str:
    return (
        f"{safe_name(bundle.name, 'bundle name')}-{safe_name(bundle.version, 'version')}-"
        f"{identity_suffix(bundle.manifest_bytes, bundle.overrides)}"
    )


def env_dir(env: Mapping) -> str:
    """Where an environment lives on the target: its versioned dir, or the prefix of an ``existing`` one."""
    if env.get("existing"):
        return str(env["existing"])  # validated as a plain absolute path by the MANIFEST rules
    h = str(env.get("content_hash") or "")
    if not re.fullmatch(r"[0-9a-f]{16,64}", h):
        raise BundleError(f"environment {env.get('name')!r}: missing or malformed content_hash")
    return f"{ENVS}/{safe_name(env['name'], 'environment name')}/{h[:16]}"


def model_version(model: Mapping) -> str:
    commit = model.get("commit")
    if commit:
        return safe_name(str(commit), "model commit")
    files = json.dumps(sorted((f["path"], f["sha256"]) for f in model.get("files", [])))
    return "local-" + hashlib.sha256(files.encode()).hexdigest()[:16]


def model_dir(model: Mapping) -> str:
    return f"{MODELS}/{safe_name(model['name'], 'model name')}/{model_version(model)}"


def hf_hub(bid: str) -> str:
    """The HF cache (``HF_HUB_CACHE``) of one bundle version: nothing in it is shared with another bundle."""
    return f"{HF_CACHES}/{safe_name(bid, 'bundle id')}/hub"


def hf_repo_dir(bid: str, repo: str) -> str:
    org, _, name = str(repo).partition("/")
    if not name:
        org, name = "", org
    folder = "models--" + "--".join(p for p in (org, name) if p)
    return f"{hf_hub(bid)}/{safe_name(folder, 'repo id')}"


def staged(target: str) -> str:
    """Where ``target`` (under /opt/llm) is prepared before it is renamed into place."""
    if not (target + "/").startswith(INSTALL_DIR + "/"):
        raise ValueError(f"{target} is not under {INSTALL_DIR}")
    return STAGING + target[len(INSTALL_DIR):]


def files_digest(files: list) -> str:
    """One sha256 over a model's file list (path, size, sha256): what a placed model dir was verified as."""
    rows = sorted((str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class Target:
    """Maps target paths (what the server sees) to host paths (under ``--root``)."""

    root: Path

    @property
    def live(self) -> bool:
        return self.root.resolve() == Path("/")

    def host(self, target: str) -> Path:
        return self.root / str(target).lstrip("/")


def wrapper_text() -> str:
    return f"""#!/bin/bash
# llm-install: rollback, uninstall and status of LLM bundles after the bundle's disk is gone.
# Written by install.sh; runs the installed copy of install.sh (which uses the installed runtime).
set -eu
exec bash {INSTALLERS}/current/install.sh "$@"
"""


VERIFIED_LOG = ".llm-verified"  # in a staged model dir: "sha256 size path" per verified, synced file


def read_verified(log: Path) -> set[tuple[str, int, str]]:
    """The ``.llm-verified`` log of a staged model dir: (sha256, size, path) of each verified, synced file."""
    out = set()
    try:
        text = log.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and len(parts[0]) == 64 and parts[1].isdigit():
            out.add((parts[0], int(parts[1]), parts[2]))
    return out


def verified_here(d: Path, f: Mapping, done: set) -> bool:
    """The log says this file was copied with this hash and synced, and it is still that size."""
    if (str(f["sha256"]), int(f["size"]), str(f["path"])) not in done:
        return False
    p = d / f["path"]
    try:
        return not p.is_symlink() and p.stat().st_size == int(f["size"])
    except OSError:
        return False
