"""``python -m installer.preflight MANIFEST.json``: run the checks and print the table (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from installer.bundle.manifest import Manifest
from installer.errors import BundleError, UsageError
from installer.preflight.context import CHECKS
from installer.preflight.nvidia import Gpu, GpuInfo
from installer.preflight.render import failed, render_table, results_to_json
from installer.preflight.run import run_preflight


def _load_manifest(path: Path) -> Manifest:
    if path.is_dir():
        path = path / "MANIFEST.json"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}",
                         hint="pass a bundle directory or its MANIFEST.json") from e
    return Manifest.from_json(data, source=str(path), partial=True)  # the server's needs; not the files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m installer.preflight",
                                description="Check this server against a bundle's MANIFEST.json.")
    p.add_argument("manifest", type=Path, help="bundle directory or MANIFEST.json")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--skip-check", action="append", default=[], metavar="NAME",
                   help=f"repeatable or comma-separated; one of: {', '.join(CHECKS)}")
    p.add_argument("--gpu-info", type=Path, help="use this GpuInfo JSON instead of detecting")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        manifest = _load_manifest(args.manifest)
        gpu_info = None
        if args.gpu_info:
            try:
                d = json.loads(args.gpu_info.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read --gpu-info {args.gpu_info}: {e}") from e
            gpu_info = GpuInfo(driver_version=d.get("driver_version"), cuda_version=d.get("cuda_version"),
                               gpus=tuple(Gpu(**g) for g in d.get("gpus", [])), source=d.get("source", "file"))
        results = run_preflight(manifest, root=args.root, skip=args.skip_check, gpu_info=gpu_info)
    except (UsageError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    sys.stdout.write(results_to_json(results) if args.json else render_table(results))
    return 1 if failed(results) else 0
