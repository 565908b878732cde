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
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from devkit.nspawn.commands import Commands
from devkit.nspawn.errors import ContainerError
from devkit.nspawn.overlay import extract, golden_tree, overlay_options, overlay_supported
from devkit.nspawn.processes import children, kill_if, proc_id
from devkit.nspawn.workdirs import base_dir, reap_stale, remove_tree, write_state

_live: weakref.WeakSet[Container] = weakref.WeakSet()


class Container(Commands):
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
        network_namespace: str | None = None,
    ) -> None:
        self.rootfs_tar = Path(rootfs_tar)
        self.binds = [(Path(h), str(c), bool(ro)) for h, c, ro in binds]
        self.name = _machine_name(name)
        # Extra systemd-nspawn options, e.g. ["--tmpfs=/tmp:mode=1777,size=8G"] (the default /tmp and
        # /dev/shm are tmpfs of 10% of the host's RAM) or ["--setenv=X=1"].
        self.nspawn_args = list(nspawn_args)
        # None: no network (only lo). A name from `ip netns` (devkit/nspawn/netns.py): the container joins it.
        self.network_namespace = network_namespace
        self._netns_fd: int | None = None
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
        write_state(self.dir, {"owner": proc_id(os.getpid())})
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
        if self.network_namespace is not None:  # /run is a fresh tmpfs for nspawn: hand it the netns as an fd
            self._netns_fd = os.open(f"/run/netns/{self.network_namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._proc = subprocess.Popen(
                self._nspawn_cmd(), stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(self._netns_fd,) if self._netns_fd is not None else (),
            )  # fmt: skip
        finally:
            console.close()
            if self._netns_fd is not None:
                os.close(self._netns_fd)
                self._netns_fd = None
        write_state(self.dir, {"owner": proc_id(os.getpid()), "nspawn": proc_id(self._proc.pid)})
        self._leader = self._find_leader(timeout=30.0)
        write_state(
            self.dir,
            {
                "owner": proc_id(os.getpid()),
                "nspawn": proc_id(self._proc.pid),
                "leader": proc_id(self._leader),
            },
        )

    def _nspawn_cmd(self) -> list[str]:
        assert self.root is not None
        nspawn = [
            "systemd-nspawn", "--quiet", "--boot",
            "--register=no", "--keep-unit",
            "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only",
            f"--machine={self.name}",
            f"--directory={self.root}",
        ]  # fmt: skip
        if self._netns_fd is not None:
            nspawn.append(f"--network-namespace-path=/proc/self/fd/{self._netns_fd}")
        else:
            nspawn.append("--private-network")
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
            for child in children(self._proc.pid):
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
                kill_if(self._leader, None)
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
                remove_tree(self.dir)
            self.timings["stop_s"] = time.monotonic() - t0
            _live.discard(self)
            self._proc = None
            self._leader = None

    def _kill(self) -> None:
        # SIGKILL to the PID namespace's init kills every process in it, nsenter'd ones included.
        if self._leader is not None:
            kill_if(self._leader, None)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    # -- its files ----------------------------------------------------------------------------------

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
    clean = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:40] or "llm-target"
    # test files run side by side on pytest-xdist workers: one machine name per worker
    worker = re.sub(r"[^A-Za-z0-9]", "", os.environ.get("PYTEST_XDIST_WORKER", ""))[:8]
    return f"{clean}-{worker}" if worker else clean


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


@atexit.register
def _stop_all() -> None:
    for c in list(_live):
        try:
            c.stop(timeout=5)
        except Exception:  # best effort at interpreter exit
            pass
