"""A private network for several nspawn targets: a bridge inside a network namespace of its own.

    admin netns (``<prefix>-admin``): lo, br0 10.77.0.1/24  <- the test runs ssh/ansible here (``exec_argv``)
        |-- veth -- host netns ``<prefix>-h1``: lo, eth0 10.77.0.11/24  <- Container(network_namespace=...)
        |-- veth -- ...

Addresses exist only inside these namespaces: no default route, nothing bridged to the machine's own
network, so from the admin namespace only the targets are reachable and from a target only the others. The
namespaces are named after the owning process (``llmnet<pid>``); :func:`reap_stale` removes those whose owner
is gone (a killed pytest), :meth:`Network.stop` removes its own.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from devkit.nspawn.errors import ContainerError

PREFIX = "llmnet"
_OWNED = re.compile(rf"{PREFIX}(\d+)-")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise ContainerError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def _namespaces() -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def reap_stale() -> list[str]:
    """Delete the namespaces of owners that are no longer running; returns their names."""
    gone = []
    for name in _namespaces():
        m = _OWNED.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)
            gone.append(name)
    return gone


class Network:
    """``with Network() as net: ns = net.add_host(1)`` -> the host's namespace name and its address."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        self.subnet = subnet
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.admin = f"{self.prefix}-admin"
        self.admin_address = f"{subnet}.1"
        self.hosts: dict[int, tuple[str, str]] = {}  # index -> (namespace, address)

    def __enter__(self) -> Network:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reap_stale()
        self.stop()  # a namespace left by an earlier Network of this process
        _ip("netns", "add", self.admin)
        self._in(self.admin, "link", "set", "lo", "up")
        self._in(self.admin, "link", "add", "br0", "type", "bridge")
        self._in(self.admin, "addr", "add", f"{self.admin_address}/24", "dev", "br0")
        self._in(self.admin, "link", "set", "br0", "up")

    def add_host(self, index: int) -> tuple[str, str]:
        """A namespace for target ``index`` (1-200) wired to the bridge; returns (namespace, address)."""
        if not 1 <= index <= 200 or index in self.hosts:
            raise ContainerError(f"host index {index} is out of range or taken")
        ns, addr = f"{self.prefix}-h{index}", f"{self.subnet}.{10 + index}"
        outer, inner = f"lv{os.getpid() % 100000}a{index}", f"lv{os.getpid() % 100000}b{index}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", self.admin)
        _ip("link", "set", inner, "netns", ns)
        self._in(ns, "link", "set", inner, "name", "eth0")
        self._in(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        self._in(ns, "link", "set", "eth0", "up")
        self._in(ns, "link", "set", "lo", "up")
        self._in(self.admin, "link", "set", outer, "master", "br0")
        self._in(self.admin, "link", "set", outer, "up")
        self.hosts[index] = (ns, addr)
        return ns, addr

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the admin namespace (where only the targets are reachable)."""
        return ["ip", "netns", "exec", self.admin, *argv]

    def stop(self) -> None:
        for name in _namespaces():
            if name.startswith(self.prefix + "-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)
        self.hosts.clear()

    @staticmethod
    def _in(ns: str, *args: str) -> None:
        _ip("-n", ns, *args)
