"""A cached Debian bookworm rootfs tarball: the "offline server" the installer tests boot with nspawn.

The image is what a realistic minimal server has (systemd, dbus, curl, openssl, libnuma, ...) and
deliberately lacks python3 and zstd: the installer must bring both. Built once with debootstrap
(~45 s), trimmed, and cached as a ``.tar.zst`` keyed by a hash of everything that shapes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOSTNAME = "llm-target"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# What a realistic server has beyond minbase. Never python3, never zstd.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnuma1",
    "procps",
    "iproute2",
    "curl",
    "ca-certificates",
    "openssl",
    "tar",
    "gzip",
    "coreutils",
)

# The fleet test's targets (tests/fleet/): the same server with an SSH daemon for Ansible; cached under its own key.
SSH_PACKAGES: tuple[str, ...] = (*PACKAGES, "openssh-server")

# Paths (relative to the rootfs) removed after debootstrap: docs, man pages, locales, apt caches.
TRIM_DIRS: tuple[str, ...] = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf",
    "var/log",
    "run",
    "tmp",
)

# Bump when the build recipe changes in a way the package list does not show.
RECIPE_VERSION = 1

HOSTS = f"""127.0.0.1\tlocalhost
127.0.1.1\t{HOSTNAME}
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""

# Keep later dpkg runs (none are expected: the target is offline) from bringing the docs back.
DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

FORBIDDEN_BINARIES: tuple[str, ...] = ("python3", "python", "zstd")


class RootfsBuildError(RuntimeError):
    """debootstrap or packing the rootfs failed; the message carries the tail of its log."""


def default_cache_dir() -> Path:
    """``$LLM_TEST_CACHE`` or ``~/.cache/llm-pack-tests``."""
    env = os.environ.get("LLM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llm-pack-tests"


def mirror() -> str:
    """The Debian mirror: ``$LLM_TEST_DEBIAN_MIRROR`` or deb.debian.org (what apt uses here)."""
    return os.environ.get("LLM_TEST_DEBIAN_MIRROR", DEFAULT_MIRROR)


def cache_key(packages: tuple[str, ...] = PACKAGES) -> str:
    """A short hash of everything that shapes the image (not the mirror: any mirror gives the same)."""
    spec = {
        "suite": SUITE,
        "variant": VARIANT,
        "packages": sorted(packages),
        "trim": list(TRIM_DIRS),
        "hosts": HOSTS,
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_rootfs(cache_dir: Path | None = None, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Return the cached rootfs tarball, building it with debootstrap if it is not there yet.

    Safe to call from several processes at once (a file lock serialises the build).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(packages)
    tarball = cache_dir / f"debian-{SUITE}-{key}.tar.zst"
    if tarball.is_file():
        return tarball
    with open(cache_dir / f".debian-{SUITE}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.is_file():  # built by another process while we waited
            return tarball
        _build(tarball, packages)
    return tarball


def _build(tarball: Path, packages: tuple[str, ...]) -> None:
    for tool in ("debootstrap", "unshare", "tar", "zstd"):
        if shutil.which(tool) is None:
            raise RootfsBuildError(
                f"{tool} not found; install the packages in .ci/apt-packages.txt "
                "(apt-get install debootstrap systemd-container zstd)"
            )
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=tarball.parent))
    try:
        root = work / "rootfs"
        t0 = time.monotonic()
        _debootstrap(root, packages, work / "debootstrap.log")
        t_boot = time.monotonic() - t0
        _customise(root)
        _check_forbidden(root)
        tmp = work / tarball.name
        _pack(root, tmp)
        os.replace(tmp, tarball)
        _write_info(tarball, packages, t_boot)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _debootstrap(root: Path, packages: tuple[str, ...], log: Path) -> None:
    # In a private mount namespace: debootstrap mounts /proc and /sys in the target, and a crash must
    # not leave them mounted on the host.
    cmd = [
        "unshare", "--mount", "--propagation", "private",
        "debootstrap", f"--variant={VARIANT}", "--include=" + ",".join(packages),
    ]  # fmt: skip
    if Path(KEYRING).is_file():  # on non-Debian hosts debootstrap does not find it by itself
        cmd.append(f"--keyring={KEYRING}")
    cmd += [SUITE, str(root), mirror()]
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RootfsBuildError(f"debootstrap failed (exit {proc.returncode}) using {mirror()}:\n{tail}")


def _customise(root: Path) -> None:
    for rel in TRIM_DIRS:
        d = root / rel
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    etc = root / "etc"
    (etc / "hostname").write_text(HOSTNAME + "\n")
    (etc / "hosts").write_text(HOSTS)
    (etc / "dpkg" / "dpkg.cfg.d" / "01-nodoc").write_text(DPKG_EXCLUDES)
    # The target is offline: no apt sources that would suggest otherwise.
    (etc / "apt" / "sources.list").write_text("")
    for d in ("var/log/journal", "var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)


def _check_forbidden(root: Path) -> None:
    found = [
        f"{d}/{name}"
        for d in ("usr/bin", "usr/sbin", "usr/local/bin")
        for name in FORBIDDEN_BINARIES
        if (root / d / name).exists()
    ]
    if found:
        raise RootfsBuildError(f"the target image must not contain {', '.join(found)}; check PACKAGES")


def _pack(root: Path, out: Path) -> None:
    cmd = [
        "tar", "--zstd", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
        "-C", str(root), "-cf", str(out), ".",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RootfsBuildError(f"packing the rootfs failed: {proc.stderr[-2000:]}")


def _write_info(tarball: Path, packages: tuple[str, ...], debootstrap_s: float) -> None:
    info = {
        "suite": SUITE,
        "variant": VARIANT,
        "packages": list(packages),
        "mirror": mirror(),
        "debootstrap_seconds": round(debootstrap_s, 1),
        "tar_bytes": tarball.stat().st_size,
    }
    tarball.with_name(tarball.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
