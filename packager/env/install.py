"""Install solved conda records into a prefix with py-rattler; run the environment's own tools."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from packager.errors import EnvironmentBuildError


def clear_prefix(prefix: Path) -> None:
    if prefix.exists():
        if any(prefix.iterdir()) and not (prefix / "conda-meta").is_dir():
            raise EnvironmentBuildError(f"{prefix} exists and is not a conda environment; refusing to delete it",
                                        hint="choose another work directory or remove it yourself")
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)


def install(records: list, prefix: Path, pkgs_dir: Path, *, specs: list[str], progress: bool) -> None:
    import rattler
    from rattler import MatchSpec

    pkgs_dir.mkdir(parents=True, exist_ok=True)
    # py-rattler 0.28.0 rejects MatchSpec objects in requested_specs; it wants the wrapped native ones.
    requested = [MatchSpec(s)._match_spec for s in specs]
    try:
        asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=pkgs_dir, show_progress=progress,
                                    requested_specs=requested))
    except Exception as e:
        raise EnvironmentBuildError(f"installing into {prefix} failed: {e}",
                                    hint="check the channel is reachable and the disk has space") from e
    # rattler marks the prefix as a cache directory; an installed env is not one (backup tools skip those)
    (prefix / "CACHEDIR.TAG").unlink(missing_ok=True)


def env_python(prefix: Path) -> Path:
    return prefix / "bin" / "python"


def run_env(prefix: Path, args: list[str], *, progress: bool, what: str,
            hint: str) -> subprocess.CompletedProcess:
    """Run the env's own python with ``args`` (env bin/ first on PATH, no user site, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PIP_USER", "PIP_TARGET",
                        "PIP_PREFIX", "CONDA_PREFIX")}
    env.update(PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONNOUSERSITE="1",
               CONDA_PREFIX=str(prefix), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # reproducible bytes: with SOURCE_DATE_EPOCH set, the .pyc files pip compiles are hash-checked instead of
    # stamped with the install time, so an environment rebuilt from the same lock packs to the same sha256 (a
    # delta bundle then leaves it out); 1980-01-01, the earliest date a wheel (zip) built on the way can hold
    env.setdefault("SOURCE_DATE_EPOCH", "315532800")
    cmd = [str(env_python(prefix)), *args]
    if progress:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=None, text=True)
    else:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-25:])
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGILL:
                how += ": the build host's CPU lacks instructions this code needs"
        raise EnvironmentBuildError(f"{what} failed ({how})" + (f":\n{tail}" if tail else ""), hint=hint)
    return proc
