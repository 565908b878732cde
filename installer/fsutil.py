"""The one place that writes, replaces, renames, removes and syncs on the target (stdlib only).

Every durable step of an install goes through here, so that (a) each one is atomic (a temp file or link in
the same directory, then ``rename``), (b) data and the directory entries that name it reach the disk before
the state file commits to them, and (c) the crash-consistency tests can stop the installer at each step.

``LLM_PACK_CRASH_AT=N`` (tests only, tests/faults/test_crash.py): the process kills itself with SIGKILL at
its Nth durable step; ``LLM_PACK_CRASH_LOG=FILE`` appends one line per step (to count them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

_CRASH_AT = int(os.environ.get("LLM_PACK_CRASH_AT") or 0)
_CRASH_LOG = os.environ.get("LLM_PACK_CRASH_LOG") or ""
_step = 0


def crash_point(label: str) -> None:
    """A durable step happened (test hook: see the module docstring; a no-op otherwise)."""
    global _step
    if not (_CRASH_AT or _CRASH_LOG):
        return
    _step += 1
    if _CRASH_LOG:
        with open(_CRASH_LOG, "a", encoding="utf-8") as f:
            f.write(f"{_step} {label}\n")
    if _step == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, chmod, rename, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    crash_point(f"write {path}")
    return path


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one step: a new link beside it renamed over the old one."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.new-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    crash_point(f"link {link} -> {target}")


def rename(src: Path, dst: Path) -> None:
    """``rename(2)`` of a directory or file that must not exist at ``dst`` yet, made durable."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
    crash_point(f"rename {src} -> {dst}")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); OSError where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    r = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a), None, str(b))
    fsync_dir(Path(a).parent)
    if Path(a).parent != Path(b).parent:
        fsync_dir(Path(b).parent)
    crash_point(f"exchange {a} <-> {b}")


def sync_fs(path: Path) -> None:
    """Flush every file and directory of the filesystem holding ``path`` (``syncfs(2)``; else ``sync``).

    One call before the state commit makes every file written by the install durable (thousands of
    environment files included) without an fsync per file.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "syncfs", None)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn is None or fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
    crash_point(f"syncfs {path}")


def remove_path(p: Path) -> None:
    """Delete a file, a link (not what it points to) or a directory tree (not a durable step: no crash point)."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)
