"""The containers' directories under ``$LLM_TEST_NSPAWN_DIR`` (default ``/var/tmp/llm-pack-nspawn``): each
has a ``state.json`` naming the processes that own it; those of dead owners are killed and removed
(:func:`reap_stale`), and a tree is removed only when nothing is mounted under it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from devkit.nspawn.errors import ContainerError
from devkit.nspawn.processes import alive, kill_if

DEFAULT_BASE_DIR = Path("/var/tmp/llm-pack-nspawn")
STATE_FILE = "state.json"


def base_dir() -> Path:
    return Path(os.environ.get("LLM_TEST_NSPAWN_DIR", DEFAULT_BASE_DIR))


def write_state(d: Path, state: dict) -> None:
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, d / STATE_FILE)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == prefix[:-1]:
                found.append(mnt)
    return found


def remove_tree(d: Path) -> None:
    # nspawn's mounts live in its private mount namespace; if one ever leaked into ours, unmount it
    # rather than deleting through it into the host.
    for mnt in sorted(_mounts_under(d), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    if _mounts_under(d):
        raise ContainerError(f"refusing to delete {d}: it still has mounts under it")
    shutil.rmtree(d, ignore_errors=True)
    if d.exists():  # e.g. chattr +i left by a test
        subprocess.run(["chattr", "-R", "-i", str(d)], check=False, capture_output=True)
        shutil.rmtree(d)


def reap_stale(base: Path | None = None, max_age_no_state: float = 600.0) -> list[Path]:
    """Kill and remove containers whose owning process is gone (crashed runs); return what was removed."""
    base = base if base is not None else base_dir()
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for d in base.iterdir():
        if not d.is_dir() or d.is_symlink() or d.name.startswith("."):
            continue
        try:
            state = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = None
        if state is None:
            try:
                age = time.time() - d.stat().st_mtime
            except OSError:
                continue
            if age < max_age_no_state:
                continue  # maybe being created right now
        elif alive(state.get("owner")):
            continue
        else:
            for key in ("leader", "nspawn"):
                ident = state.get(key)
                if ident:
                    kill_if(ident[0], ident)
            deadline = time.monotonic() + 10
            while any(alive(state.get(k)) for k in ("leader", "nspawn")) and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            remove_tree(d)
            removed.append(d)
        except (OSError, ContainerError):
            continue
    return removed
