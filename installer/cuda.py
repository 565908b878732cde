"""NVIDIA's CUDA → minimum driver table (data in ``installer/data/cuda_drivers.json``, with its source).

``min_driver(cuda)``: the driver a CUDA toolkit version needs for full support (release notes, table 3).
``driver_floor(cuda)``: the lowest driver of that CUDA major, enough under minor-version compatibility.
Standard library only: used by the packager (to record them in MANIFEST.json) and by the preflight.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "cuda_drivers.json"


@lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def _parts(v: str) -> list[int]:
    parts = re.findall(r"\d+", str(v))
    if not parts:
        raise ValueError(f"not a version: {v!r}")
    return [int(p) for p in parts]


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 comparing dotted versions numerically ("570.26" < "570.124.06"; "12.8" == "12.8.0")."""
    pa, pb = _parts(a), _parts(b)
    n = max(len(pa), len(pb))
    pa += [0] * (n - len(pa))
    pb += [0] * (n - len(pb))
    return (pa > pb) - (pa < pb)


def _major_minor(cuda: str) -> str:
    p = _parts(cuda)
    return f"{p[0]}.{p[1] if len(p) > 1 else 0}"


def min_driver(cuda: str) -> str:
    """Minimum Linux driver for CUDA ``cuda`` ("12.8" or "12.8.1"). KeyError if the table lacks it."""
    key = _major_minor(cuda)
    try:
        return table()["min_driver"][key]
    except KeyError:
        raise KeyError(f"CUDA {key} is not in {DATA.name} (known: {', '.join(table()['min_driver'])})") from None


def driver_floor(cuda: str) -> str:
    """Minor-version-compatibility floor of ``cuda``'s major. KeyError if the table lacks the major."""
    major = str(_parts(cuda)[0])
    try:
        return table()["driver_floor"][major]
    except KeyError:
        raise KeyError(f"CUDA {major}.x is not in {DATA.name}") from None
