"""The errors of the nspawn test target."""

from __future__ import annotations

import shlex
import subprocess


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
