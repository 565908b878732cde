"""Every on-disk name of the bundle format and of an install on the target, in one place.

The bundle side (what `pack build` writes and the installer reads), the split volumes, where the target
keeps trusted keys, installs and records. ``bootstrap/install.sh`` cannot import this module: the names
it spells out itself are checked against this one by tests/test_bootstrap_names.py (keep both in step).
"""

from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.json.sig"
INSTALL_SH = "install.sh"
INSTALLER_ARCHIVE = "installer.tar.gz"
ENVS_DIR = "envs"
RUNTIME_DIR = "runtime"
MODELS_DIR = "models"
SBOM_NAME = "sbom.cdx.json"  # CycloneDX 1.6 JSON SBOM of the whole version (artifact kind "sbom"; not installed)
# split volumes (written by packager/split.py, joined by bootstrap/install.sh)
PIECE_SUFFIX = ".part"
VOLUME_PREFIX = "vol"
VOLUME_INDEX = "VOLUME.sha256"
SPLIT_INFO = "SPLIT.json"

# the PATH every service and preflight probe runs with after the environment's own bin/
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ARTIFACT_KINDS = ("bootstrap", "installer", "runtime", "environment", "model", "sbom")
PROVIDED = "target"  # artifacts[].provided: not in the bundle, the target has it (a delta bundle)
PROVIDABLE_KINDS = ("runtime", "environment", "model")  # what a delta bundle may leave to the target
BUFSIZE = 1 << 20


def env_artifact(name: str) -> str:
    return f"{ENVS_DIR}/{name}.tar.zst"


def runtime_artifact(name: str) -> str:
    return f"{RUNTIME_DIR}/{name}.tar.gz"


def model_dir(name: str) -> str:
    return f"{MODELS_DIR}/{name}"


def bundle_dirname(name: str, version: str) -> str:
    return f"{name}-{version}"


# --------------------------------------------------------------------------- on the target
# relative to the install root (``--root``, "/" on a real server)
TRUSTED_KEYS = "etc/llm/trusted-keys"   # *.pub: the keys a bundle's signature is checked with
STATE_DIR = "var/lib/llm"               # state.json, lock, bundles/<id>/, staging/
STATE_FILE = "state.json"
LOCK_FILE = "lock"
# absolute paths as the services see them (joined to the root with Target.host)
INSTALL_DIR = "/opt/llm"
ENVS = f"{INSTALL_DIR}/envs"
MODELS = f"{INSTALL_DIR}/models"
HF_CACHES = f"{INSTALL_DIR}/hf-cache"
RUNTIMES = f"{INSTALL_DIR}/runtime"
INSTALLERS = f"{INSTALL_DIR}/installer"
WRAPPER = "/usr/local/sbin/llm-install"
BUNDLE_RECORDS = f"/{STATE_DIR}/bundles"
STAGING = f"/{STATE_DIR}/staging"
JOURNAL = f"{STAGING}/journal.json"
UNIT_VERSIONS = "/etc/llm/versions"
LINES = "/etc/llm/lines"
ENV_MARKER = ".llm-installed.json"
