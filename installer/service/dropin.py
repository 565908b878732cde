"""Per-instance drop-ins: the devices (CPU or NVIDIA) and the API key credential; what this systemd supports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from installer.bundle.manifest import EnvironmentRecord, ServiceRecord
from installer.errors import InstallError, UsageError
from installer.service.paths import (
    CREDENTIAL_NAME,
    MIN_CREDENTIALS_SYSTEMD,
    NVIDIA_DEVICE_GROUPS,
    NVIDIA_MODPROBE_PATHS,
    as_env,
    as_service,
)


def render_devices_dropin(env_meta: EnvironmentRecord | Mapping, *, nvidia_modprobe: str | None = None) -> str:
    """``llm@<name>.service.d/devices.conf``: no devices for CPU builds, NVIDIA devices for CUDA builds."""
    env = as_env(env_meta)  # cuda is a checked version ("12.8"), never text that could end the comment line
    head = "# Written by the llm-pack installer: device access of this instance (docs/systemd.md).\n"
    head += "[Service]\n"
    if env.is_cpu:
        return head + (
            "# CPU build: a private /dev with only the pseudo devices (and /dev/shm).\nPrivateDevices=yes\n"
        )
    lines = [
        f"# CUDA build ({env.cuda}): the host's /dev, but only NVIDIA devices are allowed.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
    ]
    lines += [f"DeviceAllow=char-{group} rw" for group in NVIDIA_DEVICE_GROUPS]
    if nvidia_modprobe:
        if nvidia_modprobe not in ["/" + p for p in NVIDIA_MODPROBE_PATHS]:
            raise InstallError(f"unexpected nvidia-modprobe path {nvidia_modprobe!r}")
        lines += [
            "# /dev/nvidia-uvm appears only once something privileged loads nvidia-uvm; the service itself",
            "# cannot ('+': this one command runs as root, '-': failure is not fatal).",
            f"ExecStartPre=-+{nvidia_modprobe} -u -c=0",
        ]
    return head + "\n".join(lines) + "\n"


def render_key_dropin(service: ServiceRecord | Mapping) -> str:
    """``llm@<name>.service.d/api-key.conf``: systemd reads the API key file as root when the unit starts and
    hands it to the service in its credentials directory, so the key file stays root:root 0600 and the
    service user needs no access to it (no group to create first, nothing owned by the service's ids)."""
    svc = as_service(service)
    if not svc.api_key_file:
        raise UsageError(f"service {svc.name} has no api_key_file")
    return (
        "# Written by the llm-pack installer: the API key of this instance (docs/systemd.md).\n"
        "# systemd reads the file as root at start; the service reads its private copy in $CREDENTIALS_DIRECTORY.\n"
        "[Service]\n"
        f"LoadCredential={CREDENTIAL_NAME}:{svc.api_key_file}\n"
        f"Environment=LLM_API_KEY_FILE=%d/{CREDENTIAL_NAME}\n"
    )


def systemd_version(root: Path = Path("/")) -> int | None:
    """The systemd version of ``root``: ``systemctl --version`` on the live system, else the version in the
    name of the tree's ``libsystemd-shared-NNN.so``; None when there is no systemd."""
    root = Path(root)
    if root == Path("/") and shutil.which("systemctl"):
        try:
            r = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            r = None
        m = re.match(r"systemd ([0-9]+)", r.stdout if r is not None else "")
        if m:
            return int(m.group(1))
    found = []
    for pattern in ("usr/lib/systemd/libsystemd-shared-*.so", "usr/lib/*/systemd/libsystemd-shared-*.so",
                    "usr/lib64/systemd/libsystemd-shared-*.so", "lib/systemd/libsystemd-shared-*.so"):
        for p in root.glob(pattern):
            m = re.match(r"libsystemd-shared-([0-9]+)", p.name)
            if m:
                found.append(int(m.group(1)))
    return max(found) if found else None


def uses_credentials(root: Path = Path("/")) -> bool:
    """True when the target's systemd hands API keys over with ``LoadCredential=`` (systemd ≥ 248)."""
    v = systemd_version(root)
    return v is not None and v >= MIN_CREDENTIALS_SYSTEMD


def find_nvidia_modprobe(root: Path) -> str | None:
    for rel in NVIDIA_MODPROBE_PATHS:
        if os.access(Path(root) / rel, os.X_OK):
            return "/" + rel
    return None
