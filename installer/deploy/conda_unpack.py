"""Relocating an unpacked conda environment: its own ``conda-unpack``, run for the final prefix."""

from __future__ import annotations

import subprocess
from pathlib import Path

from installer.errors import InstallError


def run_conda_unpack(host_prefix: Path, target_prefix: str) -> None:
    """Run the env's ``conda-unpack`` with the env's own python so the prefix baked in is ``target_prefix``.

    The env is unpacked in the staging tree and renamed to ``target_prefix`` afterwards (on a live server as
    in a staging tree under ``--root``): the script's own records and replacement function are used with that
    prefix.
    """
    script = host_prefix / "bin" / "conda-unpack"
    if not script.is_file():
        return  # packed for a fixed destination: nothing to relocate
    py = host_prefix / "bin" / "python"
    if not py.exists():
        raise InstallError(f"{host_prefix}: the environment has no bin/python to run conda-unpack with")
    # no bytecode: it would be written into the env with the staging path in it (and differ between runs)
    env = {"PATH": f"{host_prefix}/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if str(host_prefix) == target_prefix:
        cmd = [str(py), str(script)]
    else:
        code = (
            "import os, sys\n"
            "script, new_prefix, actual = sys.argv[1:4]\n"
            "sys.path.insert(0, os.path.dirname(script))\n"
            "g = {'__name__': 'conda_unpack_as_library', '__file__': script}\n"
            "exec(compile(open(script).read(), script, 'exec'), g)\n"
            "for path, placeholder, mode in g['_prefix_records']:\n"
            "    g['update_prefix'](os.path.join(actual, path), new_prefix, placeholder, mode=mode)\n"
        )
        cmd = [str(py), "-c", code, str(script), target_prefix, str(host_prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=host_prefix, check=False)
    if r.returncode != 0:
        raise InstallError(
            f"conda-unpack failed in {host_prefix} (exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip()[-2000:]}",
            hint="the environment's python cannot run on this server? see the message above",
        )
