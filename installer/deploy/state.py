"""What the installer has done on a target: ``/var/lib/llm/state.json``, its lock, and version order.

The state file is the commit point of every change: it is written to a temporary file in the same directory,
fsynced and renamed over the old one, so a crash leaves either the old or the new record, never half of one.
A bundle is recorded only once everything it needs is in place and synced (there is no "installing" record);
which version of a line is active is the symlink ``/etc/llm/lines/<name>`` (the switch), and ``lines[name]
.active`` follows it (:meth:`installer.deploy.placement.Installer.reconcile`).

Shape (format_version 1)::

    {"format_version": 1,
     "lines":   {bundle name: {"active": id, "previous": id|null, "instances": [...], "unit_files": [...]}},
     "bundles": {id: {"name", "version", "manifest_sha256", "status": "installed", "txn",
                      "installed_at", "signed_by", "envs": {env: path}, "models": {model: path},
                      "services": [...], "unit_files": [...]}},
     "objects": {path: {"kind": "tree"|"file", "users": [bundle ids], "digest"?: files_digest}},

     "dirs":    [paths of directories the installer created],
     "user_created": bool,
     "bootstrap": {"runtime": path|null, "installer": path|null, "wrapper": path|null}}

All paths are target paths (as the server sees them, without ``--root``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path

from installer.bundle.names import LOCK_FILE, STATE_DIR, STATE_FILE
from installer.errors import InstallError

STATE_FORMAT = 1


def empty_state() -> dict:
    return {
        "format_version": STATE_FORMAT,
        "lines": {},
        "bundles": {},
        "objects": {},
        "dirs": [],
        "user_created": False,
        "bootstrap": {},
    }


def state_path(root: Path) -> Path:
    return Path(root) / STATE_DIR / STATE_FILE


def load_state(root: Path) -> dict:
    p = state_path(root)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return empty_state()
    try:
        state = json.loads(raw)
    except ValueError as e:
        raise InstallError(
            f"{p}: the installer's state is not valid JSON ({e})",
            hint="restore it from a backup, or move it away to start afresh (installed files "
            "are then no longer tracked)",
        ) from e
    if state.get("format_version") != STATE_FORMAT:
        raise InstallError(
            f"{p}: state format {state.get('format_version')!r} is not supported by this installer",
            hint="use the installer of the newest bundle installed here",
        )
    base = empty_state()
    base.update(state)
    return base


def save_state(root: Path, state: dict) -> None:
    """Atomically replace the state file (temp file in the same dir, fsync, rename, fsync dir)."""
    from installer import fsutil

    p = state_path(root)
    data = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
    fsutil.write_atomic(p, data, mode=0o644)


class Lock:
    """``fcntl.flock`` on ``/var/lib/llm/lock``: one installer at a time.

    A second installer waits up to ``timeout`` seconds, then refuses, naming the holder's pid.
    """

    def __init__(self, root: Path, timeout: float = 60.0) -> None:
        self.path = Path(root) / STATE_DIR / LOCK_FILE
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, self.path):
                    break
                # the holder removed the file (uninstall) before we got it: lock the new one
                os.close(fd)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                continue
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                holder = _read_pid(fd)
                os.close(fd)
                raise InstallError(
                    f"another installer is running (pid {holder or '?'} holds {self.path}); "
                    f"waited {self.timeout:.0f} s",
                    hint="wait for it to finish and run this again (or raise --lock-timeout)",
                )
            if not announced:
                print(f"waiting for another installer (pid {_read_pid(fd) or '?'}) to finish...", flush=True)
                announced = True
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            if self.path.exists():
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- versions

_VERSION_RE = re.compile(r"^v?(\d+(?:\.\d+)*)(?:([-~._]?)([0-9A-Za-z.-]*))?(?:\+.*)?$")


def version_key(v: str) -> tuple:
    """Sort key for bundle versions: calendar ("2026.11.21") and semver ("1.2.0", "1.2.0-rc.1") alike.

    Numbers compare numerically (missing parts are 0); a pre-release suffix sorts before the release;
    build metadata (``+...``) is ignored. Anything else falls back to plain text order.
    """
    m = _VERSION_RE.match(v.strip())
    if not m:
        return (1, (), 0, v)
    nums = tuple(int(x) for x in m.group(1).split("."))
    while len(nums) > 1 and nums[-1] == 0:
        nums = nums[:-1]
    pre = m.group(3) or ""
    pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.-]", pre)) if pre else ()
    return (0, nums, 0 if pre else 1, pre_key)


def compare_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    if ka[0] != kb[0]:
        return (a > b) - (a < b)
    return (ka > kb) - (ka < kb)
