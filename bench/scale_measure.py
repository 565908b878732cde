"""Measuring one command for bench/scale.py: wall time (plus the `sync` that makes its writes durable), CPU
time and peak memory of its whole process tree; page-cache dropping; facts about the machine.

Peak RSS is the sum over the child and all its descendants (``/proc/PID/task/*/children``, then
``/proc/PID/statm``), sampled every ``FAST_S`` seconds for the first second and every ``SAMPLE_S`` after:
a few small reads per sample, far below 1 % of a core; contender and baseline carry the same sampler.
``ru_maxrss`` from ``wait4`` is not used: a child started by vfork/exec inherits the parent's high-water
mark (this script's own size), so every short command would read as large as the benchmark itself.
The disk is shared: with ``guard=(path, floor)`` the sampler also watches the free space there and kills
the command's process group (it runs in a session of its own) before it drops below ``floor`` bytes,
raising :class:`DiskGuard`; a stage that needs more room than the other users left is given up, the disk
is not filled.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FAST_S, SAMPLE_S = 0.02, 0.05
SYNC = True  # False (--no-sync, smoke tests): no sync after runs and deletes; written bytes may not count
PAGE = os.sysconf("SC_PAGE_SIZE")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass
class Run:
    """One measured command: ``seconds`` = ``cmd_s`` + ``sync_s`` (the sync after it)."""

    seconds: float
    cmd_s: float
    sync_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss: int  # bytes, whole tree, sampled
    samples: int
    load_before: float
    cache_dropped: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def combine(parts: list[Run]) -> Run:
        """Steps run one after the other (``cp`` then ``sha256sum``): times add up, memory is the largest."""
        return Run(
            seconds=sum(p.seconds for p in parts),
            cmd_s=sum(p.cmd_s for p in parts),
            sync_s=sum(p.sync_s for p in parts),
            cpu_s=sum(p.cpu_s for p in parts),
            user_s=sum(p.user_s for p in parts),
            sys_s=sum(p.sys_s for p in parts),
            peak_rss=max(p.peak_rss for p in parts),
            samples=sum(p.samples for p in parts),
            load_before=parts[0].load_before,
            cache_dropped=parts[0].cache_dropped,
        )


class DiskGuard(Exception):
    """The free space fell below the floor while a command ran; the command was killed."""


def sync() -> None:
    if SYNC:
        os.sync()


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False (silently) where that is not allowed."""
    sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # gone meanwhile
        pass
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, now (0 when it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(p)
    return total


def measure(cmd: list[str], *, env: dict | None = None, cold: bool = False, cwd: Path | None = None,
            guard: tuple[Path, int] | None = None) -> Run:
    """Run ``cmd`` (stdout/stderr kept for the error message only), then ``sync``; raise if it fails.

    ``cold``: drop the page cache first (``cache_dropped`` says whether that worked). ``guard``: see above.
    """
    dropped = drop_caches() if cold else False
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    peak = samples = 0
    tripped = ""
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, samples, tripped
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            samples += 1
            if guard and not tripped and (free := shutil.disk_usage(guard[0]).free) < guard[1]:
                tripped = f"{free / 1e9:.1f} GB free < floor {guard[1] / 1e9:.1f} GB"
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session this command leads, nothing else
                except ProcessLookupError:
                    pass
            done.wait(FAST_S if time.perf_counter() - t0 < 1.0 else SAMPLE_S)

    reader_out: list[bytes] = []
    reader = threading.Thread(target=lambda: reader_out.append(proc.stdout.read()), daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    reader.start()
    sampler.start()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its pid is not reused yet
    cmd_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    _pid, status, ru = os.wait4(proc.pid, 0)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.perf_counter()
    sync()
    sync_s = time.perf_counter() - t1
    if tripped:
        raise DiskGuard(f"{' '.join(str(c)[:40] for c in cmd[:4])} ...: killed, {tripped}")
    if proc.returncode != 0:
        out = b"".join(reader_out).decode(errors="replace")
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-4000:]}")
    return Run(seconds=cmd_s + sync_s, cmd_s=cmd_s, sync_s=sync_s, cpu_s=ru.ru_utime + ru.ru_stime,
               user_s=ru.ru_utime, sys_s=ru.ru_stime,
               peak_rss=peak, samples=samples, load_before=load, cache_dropped=dropped)


def remove(path: Path) -> None:
    """Delete a stage's output and make the deletion land (ext4 `discard` frees blocks at commit)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
    sync()


def machine_info(work: Path) -> dict:
    """nproc, CPU model, RAM, the work directory's disk, kernel, Python; load average now."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    du = shutil.disk_usage(work)
    fs = ""
    try:
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(work)], capture_output=True,
                            text=True, check=False).stdout.strip()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_bytes": os.sysconf("SC_PHYS_PAGES") * PAGE,
        "disk_total_bytes": du.total,
        "disk_free_bytes_at_start": du.free,
        "work_dir": str(work),
        "filesystem": fs,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def git_commit(root: Path) -> str:
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else ""
