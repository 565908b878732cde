"""A real systemd, booted with systemd-nspawn, with no network: the offline server of the installer tests.

Facts this is built on (measured on the test machines, whose PID 1 is not systemd):

* nspawn needs ``--register=no --keep-unit`` (there is no host dbus or machined) and must run inside
  ``unshare --mount --propagation private`` with a fresh tmpfs on ``/run`` (nspawn keeps its state there;
  a private one per container also lets several run at once).
* ``systemctl -M`` from the host does not work; ``nsenter -t <leader> -a systemctl ...`` does, so every
  command runs through nsenter into all of the container's namespaces.
* Boot to ``running`` takes under a second.

Every container lives in its own directory under ``$LLM_TEST_NSPAWN_DIR`` (default
``/var/tmp/llm-pack-nspawn``) with a ``state.json`` naming the process that owns it; containers whose
owner died (a crashed or killed pytest) are killed and removed by the next ``Container.start()``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from devkit.nspawn.overlay import extract, golden_tree, overlay_options, overlay_supported

SANE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_BASE_DIR = Path("/var/tmp/llm-pack-nspawn")
STATE_FILE = "state.json"

_live: weakref.WeakSet[Container] = weakref.WeakSet()


class ContainerError(RuntimeError):
    """The container could not be started, reached, or stopped. The message carries the console tail."""


class ContainerCommandError(subprocess.CalledProcessError):
    """A command run inside the container failed; str() shows the command and the tail of its output."""

    def __str__(self) -> str:
        def tail(data: str | bytes | None) -> str:
            if not data:
                return ""
            text = data if isinstance(data, str) else data.decode(errors="replace")
            return text[-4000:]

        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)
        return (
            f"command in container exited with {self.returncode}: {cmd}\n"
            f"--- stdout ---\n{tail(self.stdout)}\n--- stderr ---\n{tail(self.stderr)}"
        )


def base_dir() -> Path:
    return Path(os.environ.get("LLM_TEST_NSPAWN_DIR", DEFAULT_BASE_DIR))


class Container:
    """A booted Debian with systemd as PID 1, no network, and optional bind mounts from the host.

    ``with Container(tar) as c:`` starts it and waits until systemd is running; leaving the block
    powers it off and deletes its tree. ``binds`` are ``(host_path, container_path, readonly)``.
    """

    def __init__(
        self,
        rootfs_tar: Path,
        *,
        binds: Iterable[tuple[Path, str, bool]] = (),
        name: str = "llm-target",
        keep: bool | None = None,
        overlay: bool | None = None,
        nspawn_args: Sequence[str] = (),
    ) -> None:
        self.rootfs_tar = Path(rootfs_tar)
        self.binds = [(Path(h), str(c), bool(ro)) for h, c, ro in binds]
        self.name = _machine_name(name)
        # Extra systemd-nspawn options, e.g. ["--tmpfs=/tmp:mode=1777,size=8G"] (the default /tmp and
        # /dev/shm are tmpfs of 10% of the host's RAM) or ["--setenv=X=1"].
        self.nspawn_args = list(nspawn_args)
        # LLM_TEST_KEEP_CONTAINER=1 keeps the tree after stop() for debugging.
        self.keep = keep if keep is not None else os.environ.get("LLM_TEST_KEEP_CONTAINER") == "1"
        # Overlay over a shared extracted tree (fast) unless LLM_TEST_NSPAWN_OVERLAY=0 or unsupported;
        # else a full extraction per container.
        if overlay is None:
            overlay = os.environ.get("LLM_TEST_NSPAWN_OVERLAY", "1") != "0"
        self.overlay = overlay
        self.dir: Path | None = None
        self.root: Path | None = None  # the directory nspawn boots (the overlay's mount point, if any)
        self._lower: Path | None = None
        self._golden_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        self.timings: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.start()
            self.wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Extract the rootfs into a fresh directory and boot it (returns once systemd is PID 1)."""
        if self._proc is not None:
            raise ContainerError("container already started")
        for tool in ("systemd-nspawn", "nsenter", "unshare", "tar"):
            if shutil.which(tool) is None:
                raise ContainerError(f"{tool} not found; apt-get install debootstrap systemd-container zstd")
        for host, _, _ in self.binds:
            if not host.exists():
                raise ContainerError(f"bind source {host} does not exist")
        base = base_dir()
        base.mkdir(parents=True, exist_ok=True)
        reap_stale(base)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
        self.root = self.dir / "rootfs"
        self.root.mkdir()
        _write_state(self.dir, {"owner": _proc_id(os.getpid())})
        _live.add(self)

        t0 = time.monotonic()
        if self.overlay:
            self._lower, self._golden_fd = golden_tree(self.rootfs_tar, base)
            self.timings["golden_s"] = time.monotonic() - t0
            if not overlay_supported(self._lower, self.dir):
                self.overlay = False
                os.close(self._golden_fd)
                self._golden_fd = None
        if self.overlay:
            for d in ("upper", "work"):
                (self.dir / d).mkdir()
        else:
            extract(self.rootfs_tar, self.root)
        self.timings["prepare_s"] = time.monotonic() - t0

        self._t_boot = time.monotonic()
        console = open(self.dir / "console.log", "wb")
        try:
            self._proc = subprocess.Popen(
                self._nspawn_cmd(), stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            console.close()
        _write_state(self.dir, {"owner": _proc_id(os.getpid()), "nspawn": _proc_id(self._proc.pid)})
        self._leader = self._find_leader(timeout=30.0)
        _write_state(
            self.dir,
            {
                "owner": _proc_id(os.getpid()),
                "nspawn": _proc_id(self._proc.pid),
                "leader": _proc_id(self._leader),
            },
        )

    def _nspawn_cmd(self) -> list[str]:
        assert self.root is not None
        nspawn = [
            "systemd-nspawn", "--quiet", "--boot",
            "--register=no", "--keep-unit",
            "--private-network",
            "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only",
            f"--machine={self.name}",
            f"--directory={self.root}",
        ]  # fmt: skip
        nspawn += self.nspawn_args
        for host, cpath, ro in self.binds:
            opt = "--bind-ro" if ro else "--bind"
            nspawn.append(f"{opt}={_escape_colon(str(host.resolve()))}:{_escape_colon(cpath)}")
        script = "mount -t tmpfs -o mode=0755 tmpfs /run && "
        args: list[str] = []
        if self.overlay:
            assert self._lower is not None and self.dir is not None
            script += 'mount -t overlay overlay -o "$1" "$2" && shift 2 && '
            args = [overlay_options(self._lower, self.dir / "upper", self.dir / "work"), str(self.root)]
        script += 'exec "$@"'
        unshare = ["unshare", "--mount", "--propagation", "private"]
        return [*unshare, "/bin/sh", "-c", script, "sh", *args, *nspawn]

    def _find_leader(self, timeout: float) -> int:
        """The container's PID 1 (systemd), a direct child of nspawn in a new PID namespace."""
        assert self._proc is not None
        own_ns = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with {self._proc.returncode} before booting\n{self.console()}"
                )
            for child in _children(self._proc.pid):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    ns = os.readlink(f"/proc/{child}/ns/pid")
                except OSError:
                    continue
                if comm in ("systemd", "init") and ns != own_ns:
                    return child
            time.sleep(0.02)
        raise ContainerError(f"no systemd appeared in the container within {timeout:.0f} s\n{self.console()}")

    @property
    def leader_pid(self) -> int:
        if self._leader is None:
            raise ContainerError("container not started")
        return self._leader

    def wait_running(self, timeout: float = 60.0) -> str:
        """Wait until ``systemctl is-system-running`` says running or degraded; return that state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ContainerError(f"container exited while booting\n{self.console()}")
            res = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                self.timings.setdefault("boot_s", time.monotonic() - self._t_boot)
                return state
            # "offline" early in boot only means systemd's socket is not up yet: keep polling.
            if state in ("stopping", "maintenance"):
                break
            time.sleep(0.05)
        failed = self.run(["systemctl", "--failed", "--no-legend"], check=False, timeout=10).stdout
        raise ContainerError(
            f"systemd in the container did not reach running (last state {state!r})\n"
            f"failed units:\n{failed}\nconsole:\n{self.console()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Power off (SIGTERM to nspawn makes systemd shut down), kill after ``timeout``, delete the tree."""
        t0 = time.monotonic()
        try:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._proc.send_signal(signal.SIGTERM)
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
            elif self._leader is not None:
                _kill_if(self._leader, None)
        finally:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self.timings["poweroff_s"] = time.monotonic() - t0
            if self._golden_fd is not None:
                os.close(self._golden_fd)
                self._golden_fd = None
            if self.dir is not None and not self.keep:
                _remove_tree(self.dir)
            self.timings["stop_s"] = time.monotonic() - t0
            _live.discard(self)
            self._proc = None
            self._leader = None

    def _kill(self) -> None:
        # SIGKILL to the PID namespace's init kills every process in it, nsenter'd ones included.
        if self._leader is not None:
            _kill_if(self._leader, None)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    # -- using it ----------------------------------------------------------------------------------

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float | None = 120.0,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
        cwd: str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` as root inside all of the container's namespaces, with a clean environment.

        A string is run by ``/bin/bash -c``. The environment is PATH, HOME, LANG and ``env``; nothing
        of the host's leaks in. On timeout the whole command (its process group) is killed.
        """
        argv = ["/bin/bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        envv = {"PATH": SANE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", **(env or {})}
        full = ["nsenter", "-t", str(self.leader_pid), "-a", "--", "/usr/bin/env", "-i"]
        if cwd is not None:
            full.append(f"--chdir={cwd}")
        full += [f"{k}={v}" for k, v in envv.items()] + argv
        if isinstance(input, str) and not text:
            input = input.encode()
        proc = subprocess.Popen(
            full, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout or 0, output=out, stderr=err) from None
        except BaseException:
            _killpg(proc.pid)
            proc.wait()
            raise
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise ContainerCommandError(proc.returncode, cmd, out, err)
        return res

    def copy_in(self, host_path: Path, container_path: str, *, mode: int | None = None) -> None:
        """Copy a file or directory tree from the host to ``container_path`` (owned by root).

        Streams a tar into the container's own ``tar``, so it sees the container's mounts
        (``/run``, ``/tmp``, binds) exactly as processes inside do.
        """
        host_path = Path(host_path)
        if not host_path.exists():
            raise FileNotFoundError(host_path)
        dest = PurePosixPath(container_path)
        if not dest.is_absolute():
            raise ValueError(f"container path must be absolute: {container_path}")
        self.run(["mkdir", "-p", str(dest.parent)])
        full = [
            "nsenter", "-t", str(self.leader_pid), "-a", "--", "/usr/bin/env", "-i", f"PATH={SANE_PATH}",
            "tar", "-x", "-f", "-", "--no-same-owner", "-C", str(dest.parent),
        ]  # fmt: skip
        proc = subprocess.Popen(full, stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tf:
                tf.add(host_path, arcname=dest.name)
        except BrokenPipeError:
            pass
        finally:
            proc.stdin.close()
        err = proc.stderr.read() if proc.stderr else b""
        if proc.wait() != 0:
            msg = err.decode(errors="replace")
            raise ContainerError(f"copying {host_path} to {container_path} failed: {msg}")
        if mode is not None:
            self.run(["chmod", f"{mode:o}", str(dest)])

    def write_file(self, container_path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Create (or replace) a small file inside the container."""
        data = content.encode() if isinstance(content, str) else content
        dest = PurePosixPath(container_path)
        self.run(
            ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"', "sh", str(dest),
             f"{mode:o}"],
            input=data, text=False,
        )  # fmt: skip

    @property
    def host_root(self) -> Path:
        """The container's root directory as the host can read and write it while it runs.

        With the overlay this is ``/proc/<nspawn>/root/<mount point>`` (the overlay exists only in
        nspawn's private mount namespace); without it, the extracted tree itself.
        """
        if self.root is None or (self.overlay and self._proc is None):
            raise ContainerError("container not running")
        if self.overlay:
            assert self._proc is not None
            return Path(f"/proc/{self._proc.pid}/root") / self.root.relative_to("/")
        return self.root

    def path(self, container_path: str) -> Path:
        """The host path of ``container_path`` in the container's root directory (valid while it runs).

        Symlinks are resolved inside the rootfs (``/lib`` -> ``usr/lib``). Only the root tree is
        seen: what is mounted inside the container (``/run``, ``/tmp``, ``/dev``, ``/proc``, binds) is not.
        """
        return _resolve_in_root(self.host_root, container_path)

    def changed_paths(self) -> list[str]:
        """Paths written, created or deleted in the root tree since the container was created.

        Only with the overlay: the entries of its upper directory (a deleted file shows as a whiteout,
        a directory shows once anything under it changed). Includes what systemd itself writes at boot
        (journal, /var/lib/systemd), so compare two calls rather than expect [].
        """
        if not self.overlay or self.dir is None:
            raise ContainerError("changed_paths() needs the overlay (LLM_TEST_NSPAWN_OVERLAY not 0)")
        upper = self.dir / "upper"
        out = []
        for dirpath, dirnames, filenames in os.walk(upper):
            rel = "/" + os.path.relpath(dirpath, upper)
            out.extend(os.path.normpath(f"{rel}/{n}") for n in dirnames + filenames)
        return sorted(out)

    def journal(self, unit: str | None = None, *, lines: int | None = None, output: str = "short-iso") -> str:
        """The container's journal, for one unit if given (``journalctl -u unit``)."""
        cmd = ["journalctl", "--no-pager", "-o", output]
        if unit is not None:
            cmd += ["-u", unit]
        if lines is not None:
            cmd += ["-n", str(lines)]
        return self.run(cmd, check=False, timeout=30).stdout

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check, timeout=60)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit, e.g. ``show("x.service", "MainPID")``."""
        return self.run(["systemctl", "show", "-P", prop, unit], timeout=30).stdout.strip()

    def console(self) -> str:
        """The tail of the container's console (boot messages, nspawn errors)."""
        if self.dir is None:
            return ""
        try:
            return (self.dir / "console.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""


# -- helpers -----------------------------------------------------------------------------------------


def _machine_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:40]
    return clean or "llm-target"


def _escape_colon(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _resolve_in_root(root: Path, path: str) -> Path:
    parts = [p for p in PurePosixPath("/", path).parts[1:] if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ContainerError(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            tparts = [p for p in PurePosixPath(target).parts if p not in ("", ".")]
            if target.startswith("/"):
                resolved = []
                tparts = tparts[1:]
            parts = tparts + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _proc_id(pid: int) -> list[int]:
    """A (pid, start time) pair: survives PID reuse."""
    return [pid, _start_time(pid) or 0]


def _alive(ident: Sequence[int] | None) -> bool:
    return bool(ident) and _start_time(ident[0]) == ident[1]


def _kill_if(pid: int, ident: Sequence[int] | None) -> None:
    if ident is not None and not _alive(ident):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_state(d: Path, state: dict) -> None:
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


def _remove_tree(d: Path) -> None:
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
        elif _alive(state.get("owner")):
            continue
        else:
            for key in ("leader", "nspawn"):
                ident = state.get(key)
                if ident:
                    _kill_if(ident[0], ident)
            deadline = time.monotonic() + 10
            while any(_alive(state.get(k)) for k in ("leader", "nspawn")) and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            _remove_tree(d)
            removed.append(d)
        except (OSError, ContainerError):
            continue
    return removed


@atexit.register
def _stop_all() -> None:
    for c in list(_live):
        try:
            c.stop(timeout=5)
        except Exception:  # best effort at interpreter exit
            pass
