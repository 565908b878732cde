"""Where the service side lives on the target: per-instance unit, env file and drop-in paths; the user."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from installer.bundle import manifest as records
from installer.bundle import names
from installer.bundle.manifest import EnvironmentRecord, ServiceRecord
from installer.errors import UsageError

log = logging.getLogger(__name__)


USER = "llm"


GROUP = "llm"


TEMPLATE = "llm@.service"


UNIT_DIR = Path("etc/systemd/system")


ENV_DIR = Path("etc/llm")


LAUNCHER = Path("opt/llm/bin/llm-serve")


SYSUSERS_CONF = Path("etc/sysusers.d/llm.conf")


DROPIN_NAME = "devices.conf"


KEY_DROPIN_NAME = "api-key.conf"  # LoadCredential= of the instance's API key file


CREDENTIAL_NAME = "api-key"


# LoadCredential= came with systemd 247, the %d specifier (the credentials directory) with 248.
MIN_CREDENTIALS_SYSTEMD = 248


CACHE_ROOT = Path("/var/cache/llm")  # CacheDirectory=llm/%i


DEFAULT_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


SYSTEM_PATH = names.SYSTEM_PATH


UNITS_SRC = Path(__file__).resolve().parent / "units"


# /proc/devices names of the NVIDIA character devices CUDA opens (seen on driver 580: nvidia, nvidiactl,
# nvidia-uvm, nvidia-caps; older drivers call major 195 nvidia-frontend). A name the running driver does
# not have is skipped by systemd.
NVIDIA_DEVICE_GROUPS = ("nvidia-frontend", "nvidia", "nvidiactl", "nvidia-uvm", "nvidia-caps")


NVIDIA_MODPROBE_PATHS = ("usr/bin/nvidia-modprobe", "usr/sbin/nvidia-modprobe", "bin/nvidia-modprobe")


# systemctl verbs that only edit unit files, so they work on a staging tree with --root
UNIT_FILE_VERBS = frozenset(
    {"enable", "disable", "reenable", "preset", "mask", "unmask", "is-enabled", "revert"}
)


_NAME_RE = records.NAME_RE  # always fullmatch: with match/search, '$' lets a trailing newline through


_PLAIN_VALUE_RE = re.compile(r"[A-Za-z0-9_./:,@+=-]*")


class InstancePaths(NamedTuple):
    """Where one service's parts are on the target (absolute target paths, not prefixed with ``root``).

    ``model_path`` is what vLLM gets as ``--model``: the model directory, or the repo id when the service is
    served by repo id from the Hugging Face cache view ``hf_cache``. ``env_meta`` is the environment's
    MANIFEST entry (a record or its dict) when the manifest being installed does not carry it (a
    model-only bundle). ``adapters`` are the model's LoRA adapters: ``(name, directory, rank)``.
    """

    env_prefix: Path
    model_path: str
    hf_cache: Path | None = None
    env_meta: Mapping | EnvironmentRecord | None = None
    adapters: tuple[tuple[str, str, int], ...] = ()  # LoRA adapters served with the model: (name, dir, rank)


def check_instance_name(name: str) -> str:
    """Service names become unit instance names and file names: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"service name {name!r} cannot name a systemd instance",
            hint="use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)",
        )
    return name


_RAY_UNIT_RE = re.compile(r"llm-ray-(?:head|worker)@(.+)\.service")


def unit_name(name: str) -> str:
    """``llm@<name>.service`` for an instance name; a Ray unit of an instance (``llm-ray-head@<name>.service``,
    installer/service/cluster.py) stands for itself."""
    m = _RAY_UNIT_RE.fullmatch(name) if isinstance(name, str) else None
    if m:
        check_instance_name(m.group(1))
        return name
    return f"llm@{check_instance_name(name)}.service"


def env_file_path(root: Path, name: str) -> Path:
    return Path(root) / ENV_DIR / f"{check_instance_name(name)}.env"


def dropin_path(root: Path, name: str) -> Path:
    return Path(root) / UNIT_DIR / f"{unit_name(name)}.d" / DROPIN_NAME


def key_dropin_path(root: Path, name: str) -> Path:
    return Path(root) / UNIT_DIR / f"{unit_name(name)}.d" / KEY_DROPIN_NAME


def cache_dir(name: str) -> Path:
    return CACHE_ROOT / check_instance_name(name)


def as_service(service: ServiceRecord | Mapping) -> ServiceRecord:
    """The record of a ``services[]`` entry; a dict is checked with the service rules first (UsageError)."""
    if isinstance(service, ServiceRecord):
        return service
    problems = records.service_problems(service)
    if problems:
        rel, msg = problems[0]
        raise UsageError(f"service {service.get('name')!r}: {records.field_path(rel)}: {msg}",
                         hint="fix the manifest's services[] entry (`pack validate` checks the same rules)")
    return records.as_service(service)


def as_env(env_meta: EnvironmentRecord | Mapping) -> EnvironmentRecord:
    return records.as_environment(env_meta)


def is_cpu_env(env_meta: EnvironmentRecord | Mapping) -> bool:
    """An environment built without CUDA (``cuda: null``) serves on CPU."""
    return as_env(env_meta).is_cpu
