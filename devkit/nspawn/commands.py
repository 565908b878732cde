"""Using a running container: commands run through ``nsenter`` into all of its namespaces with a clean
environment, files copied or written in, the journal and ``systemctl`` (:class:`Commands`, a part of
:class:`~devkit.nspawn.container.Container`)."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from devkit.nspawn.errors import ContainerCommandError, ContainerError
from devkit.nspawn.processes import killpg

SANE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Commands:
    """Commands and files inside the container; mixed into :class:`~devkit.nspawn.container.Container`
    (which provides ``leader_pid``)."""

    leader_pid: int

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
            killpg(proc.pid)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout or 0, output=out, stderr=err) from None
        except BaseException:
            killpg(proc.pid)
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
