"""Where the installer puts things on the target, and the names it derives from a bundle's manifest.

Target paths (with ``--root DIR`` everything lands under DIR instead and nothing runs)::

    /opt/llm/envs/<env>/<content_hash[:16]>/     unpacked env, conda-unpack run there, .llm-installed.json
    /opt/llm/models/<model>/<commit>/             model files (real files)
    /opt/llm/hf-cache/hub/models--org--name/      HF cache view: snapshots/<sha>/* -> real files, refs/main
    /opt/llm/runtime/<sha[:16]>/, current         the installer's Python (kept for rollback/uninstall/status)
    /opt/llm/installer/<sha[:16]>/, current       the installer package + install.sh
    /usr/local/sbin/llm-install                   wrapper: the installed install.sh without the bundle's disk
    /var/lib/llm/state.json, lock, bundles/<id>/  records (installer.state), a copy of each MANIFEST.json

Every name taken from a manifest is checked here before it becomes part of a path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from installer import state as st
from installer.bundle import MANIFEST_NAME, Bundle
from installer.errors import BundleError

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


def safe_name(value: str, what: str) -> str:
    if not _NAME_RE.match(str(value)) or ".." in str(value):
        raise BundleError(
            f"unsafe {what} {value!r} in {MANIFEST_NAME}",
            hint="the manifest was not produced by `pack build`; do not install this bundle",
        )
    return str(value)


def bundle_id(bundle: Bundle) -> str:
    return (
        f"{safe_name(bundle.name, 'bundle name')}-{safe_name(bundle.version, 'version')}-"
        f"{bundle.manifest_sha256[:12]}"
    )


def env_dir(env: Mapping) -> str:
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


def hf_repo_dir(repo: str) -> str:
    org, _, name = str(repo).partition("/")
    if not name:
        org, name = "", org
    folder = "models--" + "--".join(p for p in (org, name) if p)
    return f"{HF_HUB}/{safe_name(folder, 'repo id')}"


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
