"""Running ``systemctl``: reload, enable/disable/start/stop/restart, unit properties.

Live system only; with a staging root only unit-file verbs run, with ``--root``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from installer.errors import InstallError
from installer.service.paths import UNIT_FILE_VERBS, unit_name


def systemd_running() -> bool:
    """True when systemd is PID 1 here (the check systemd's own sd_booted() makes)."""
    return os.path.isdir("/run/systemd/system")


def systemctl(*args: str, root: Path = Path("/"), check: bool = True) -> subprocess.CompletedProcess:
    """Run ``systemctl ARGS`` on the live system.

    With a staging ``root`` only unit-file verbs (enable, disable, mask...) run, as ``systemctl --root``;
    anything that would touch running services is refused.
    """
    root = Path(root)
    cmd = ["systemctl"]
    if root != Path("/"):
        if not args or args[0] not in UNIT_FILE_VERBS:
            raise InstallError(
                f"`systemctl {' '.join(args)}` would act on the running system, but the target is "
                f"the staging tree {root}",
                hint="start services after booting the image",
            )
        cmd.append(f"--root={root}")
    elif not systemd_running():
        raise InstallError(
            "systemd is not running on this machine (no /run/systemd/system)",
            hint="install with --root DIR for an image, or run on a server booted with systemd",
        )
    cmd += list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise InstallError(
            f"`{' '.join(cmd)}` failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}",
            hint="see `journalctl -xe` and `systemctl status` of the unit",
        )
    return r


def daemon_reload(root: Path = Path("/")) -> None:
    """``systemctl daemon-reload`` on a live system; nothing to do for a staging tree."""
    if Path(root) == Path("/"):
        systemctl("daemon-reload")


def enable(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("enable", *units, root=root)


def disable(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("disable", *units, root=root, check=False)


def start(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("start", *units, root=root)


def stop(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units and Path(root) == Path("/"):
        systemctl("stop", *units)


def restart_instances(names: Iterable[str], root: Path = Path("/")) -> list[str]:
    """Restart the given instances that are running (``try-restart``); returns those restarted.

    A staging tree has nothing running: returns [].
    """
    if Path(root) != Path("/"):
        return []
    running = [n for n in names if unit_property(n, "ActiveState") in ("active", "activating", "reloading")]
    if running:
        systemctl("try-restart", *[unit_name(n) for n in running])
    return running


def unit_properties(name: str, props: Iterable[str]) -> dict[str, str]:
    """``systemctl show -p ...`` of one instance on the live system ({} when systemd is not running)."""
    if not systemd_running():
        return {}
    r = systemctl("show", unit_name(name), "-p", ",".join(props), check=False)
    out = {}
    for line in r.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def unit_property(name: str, prop: str) -> str | None:
    return unit_properties(name, [prop]).get(prop)
