"""pytest fixtures for the nspawn test target. Use with ``pytest_plugins = ["tests.nspawn.fixtures"]``
(in a conftest.py) or ``from tests.nspawn.fixtures import nspawn_rootfs, nspawn_container``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.nspawn.container import Container
from devkit.nspawn.rootfs import ensure_rootfs


def require_nspawn() -> None:
    """Skip unless we are root (nspawn, unshare and nsenter need it); fail if the tools are missing."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn test target needs root (unshare, nsenter, debootstrap)")
    tools = ("systemd-nspawn", "debootstrap", "nsenter", "unshare", "zstd")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install $(cat .ci/apt-packages.txt)")


@pytest.fixture(scope="session")
def nspawn_rootfs() -> Path:
    """The cached Debian bookworm rootfs tarball (built on first use, ~1 min)."""
    require_nspawn()
    return ensure_rootfs()


@pytest.fixture
def nspawn_container(nspawn_rootfs: Path) -> Iterator[Container]:
    """A freshly booted, network-less container; powered off and deleted afterwards."""
    with Container(nspawn_rootfs) as c:
        yield c
