"""A real systemd test target: a debootstrapped Debian booted with systemd-nspawn, with no network.

from devkit.nspawn import Container, ensure_rootfs

with Container(ensure_rootfs(), binds=[(usb_dir, "/media/usb", True)]) as c:
    c.run(["bash", "/media/usb/install.sh"])
    c.run("systemctl start llm@tiny")
    print(c.journal("llm@tiny"))
"""

from devkit.nspawn.container import Container
from devkit.nspawn.errors import ContainerCommandError, ContainerError
from devkit.nspawn.rootfs import PACKAGES, SSH_PACKAGES, RootfsBuildError, default_cache_dir, ensure_rootfs
from devkit.nspawn.workdirs import reap_stale

__all__ = [
    "PACKAGES",
    "SSH_PACKAGES",
    "Container",
    "ContainerCommandError",
    "ContainerError",
    "RootfsBuildError",
    "default_cache_dir",
    "ensure_rootfs",
    "reap_stale",
]
