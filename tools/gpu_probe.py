#!/usr/bin/env python3
"""Capture what a GPU server says about its NVIDIA driver and GPUs, for test fixtures.

    python3 tools/gpu_probe.py --out DIR

Writes the raw outputs the detection in ``installer/preflight/nvidia.py`` parses (plain ``nvidia-smi``, the CSV
query, ``-q -x``, ``-q``, ``/proc/driver/nvidia/version``, an NVML reading through ctypes) plus what
``detect_gpus`` makes of each source. Standard library only; every step that fails is logged, not fatal.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from installer.preflight import nvidia as gpu


def _save(out: Path, name: str, argv: list[str], log: list[str]) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        (out / name).write_text(p.stdout)
        log.append(f"$ {' '.join(argv)}  -> rc={p.returncode} ({len(p.stdout)} bytes)"
                   + (f" stderr: {p.stderr.strip()[:500]}" if p.stderr.strip() else ""))
    except (OSError, subprocess.TimeoutExpired) as e:
        log.append(f"$ {' '.join(argv)}  -> {e}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = [f"python {sys.version.split()[0]} on {platform.platform()} ({platform.machine()})"]
    fields = ",".join(gpu.QUERY_FIELDS)
    _save(out, "nvidia-smi.txt", ["nvidia-smi"], log)
    _save(out, "nvidia-smi-query.csv", ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
          log)
    _save(out, "nvidia-smi-query-header.csv", ["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], log)
    _save(out, "nvidia-smi-q.xml", ["nvidia-smi", "-q", "-x"], log)
    _save(out, "nvidia-smi-q.txt", ["nvidia-smi", "-q"], log)
    _save(out, "nvidia-smi-help-query-gpu.txt", ["nvidia-smi", "--help-query-gpu"], log)
    _save(out, "nvidia-smi-L.txt", ["nvidia-smi", "-L"], log)
    try:
        (out / "proc-driver-nvidia-version.txt").write_text(gpu.PROC_VERSION.read_text())
    except OSError as e:
        log.append(f"{gpu.PROC_VERSION}: {e}")
    try:
        reading = gpu.read_nvml()
        (out / "nvml.json").write_text(json.dumps(reading, indent=1) + "\n")
        log.append(f"NVML: {len(reading['devices'])} device(s)")
    except Exception:
        log.append("NVML failed:\n" + traceback.format_exc())
    for label, kwargs in (("detect", {}), ("detect-nvml-only", {"nvidia_smi": None}),
                          ("detect-proc-only", {"nvidia_smi": None, "nvml_library": None})):
        try:
            info = gpu.detect_gpus(**kwargs)
            (out / f"{label}.json").write_text(json.dumps(info.to_dict(), indent=1) + "\n")
        except Exception:
            log.append(f"{label} failed:\n" + traceback.format_exc())
    (out / "probe.log").write_text("\n".join(log) + "\n")
    print("\n".join(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
