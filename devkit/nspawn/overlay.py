"""A read-only extracted copy of the rootfs ("golden tree") shared by containers through overlayfs.

Extracting the ~10k-file rootfs takes 0.5 s on an idle machine but 6-11 s when other jobs load the disk;
an overlay mount over one golden tree makes each container's start and teardown independent of that.
Each container holds a shared flock on its golden tree's lock file while it runs; golden trees of other
tarballs that no container holds are deleted. Delete ``$LLM_TEST_NSPAWN_DIR/.golden`` to reclaim the space.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

GOLDEN_DIR = ".golden"


class GoldenError(RuntimeError):
    pass


def extract(tar: Path, root: Path) -> None:
    """Extract a rootfs tarball (``.tar`` or ``.tar.zst``) into ``root``, keeping owners and xattrs."""
    if not tar.is_file():
        raise GoldenError(f"rootfs tarball {tar} not found; build it with devkit.nspawn.ensure_rootfs()")
    cmd = ["tar", "-x", "-f", str(tar), "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=*"]
    if tar.name.endswith(".zst"):
        cmd.insert(1, "--zstd")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GoldenError(f"extracting {tar} failed: {proc.stderr[-2000:]}")


def golden_tree(tar: Path, base: Path) -> tuple[Path, int]:
    """The extracted tree for ``tar`` (extracted on first use) and an fd holding a shared lock on it.

    Close the fd when the container using the tree is gone.
    """
    st = tar.stat()
    key = f"{tar.name.split('.tar')[0]}-{st.st_size}-{st.st_mtime_ns}"
    gdir = base / GOLDEN_DIR
    gdir.mkdir(parents=True, exist_ok=True)
    tree = gdir / key
    # Two locks: "<key>.extract" serialises the one-time extraction; "<key>.lock" is held shared by
    # every container using the tree, so _prune can tell a tree in use from a stale one.
    fd = os.open(gdir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not tree.is_dir():
            with open(gdir / f"{key}.extract", "w") as xlock:
                fcntl.flock(xlock, fcntl.LOCK_EX)
                if not tree.is_dir():
                    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=gdir))
                    try:
                        extract(tar, tmp)
                        tmp.chmod(0o755)
                        os.replace(tmp, tree)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        os.close(fd)
        raise
    _prune(gdir, keep=key)
    return tree, fd


def _prune(gdir: Path, keep: str) -> None:
    for lock in gdir.glob("*.lock"):
        key = lock.name[: -len(".lock")]
        if key == keep:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a running container uses it
        try:
            shutil.rmtree(gdir / key, ignore_errors=True)
            (gdir / f"{key}.extract").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for tmp in gdir.glob(".*-*"):  # half-extracted trees of crashed runs (no extraction lock held)
        if not tmp.is_dir():
            continue
        xlock = gdir / f"{tmp.name[1:].rsplit('-', 1)[0]}.extract"
        try:
            fd = os.open(xlock, os.O_RDWR)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def overlay_supported(lower: Path, scratch: Path) -> bool:
    """Whether an overlay over ``lower`` with upper/work dirs in ``scratch`` mounts here.

    A probe in a throw-away mount namespace: nothing stays mounted.
    """
    dirs = [scratch / n for n in ("probe-upper", "probe-work", "probe-merged")]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay", "overlay",
             "-o", overlay_options(lower, dirs[0], dirs[1]), str(dirs[2])],
            capture_output=True, check=False, timeout=30,
        )  # fmt: skip
        return proc.returncode == 0
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    for p in (lower, upper, work):
        if any(ch in str(p) for ch in ",:\\ \n"):
            raise GoldenError(f"path not usable in overlay options: {p}")
    return f"lowerdir={lower},upperdir={upper},workdir={work}"
