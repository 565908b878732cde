"""Processes by identity: a (pid, start time) pair that survives PID reuse, children, and killing."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_id(pid: int) -> list[int]:
    """A (pid, start time) pair: survives PID reuse."""
    return [pid, start_time(pid) or 0]


def alive(ident: Sequence[int] | None) -> bool:
    return bool(ident) and start_time(ident[0]) == ident[1]


def kill_if(pid: int, ident: Sequence[int] | None) -> None:
    if ident is not None and not alive(ident):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
