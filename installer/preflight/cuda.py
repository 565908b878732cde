"""NVIDIA driver requirements of CUDA versions (stdlib only: runs on the target in the installer's preflight).

The table is data, kept with its source in ``installer/data/cuda_drivers.json``:

- ``min_driver(cuda)``: the driver the CUDA toolkit release ships with. A driver at least this new runs
  everything built for that CUDA (PTX JIT included).
- ``driver_floor(cuda)``: the oldest driver that can run that CUDA major at all through minor-version
  compatibility (e.g. any 12.x on >= 525.60.13); below it nothing built for that major runs.

Versions are compared numerically per dotted component (``compare_versions``), never as strings.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from installer.errors import UsageError

TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "cuda_drivers.json"


@lru_cache(maxsize=1)
def table() -> dict:
    """The parsed driver table: ``source``, ``min_driver`` {cuda: driver}, ``minor_version_floor`` {major: driver}."""
    with open(TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


def _parts(version: str) -> tuple[int, ...]:
    text = str(version).strip()
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        raise UsageError(f"not a numeric version: {version!r}",
                         hint="versions look like 12.8 (CUDA) or 570.26 / 535.54.03 (driver)") from None


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, equal to or newer than ``b`` ("570.26" == "570.26.0")."""
    pa, pb = _parts(a), _parts(b)
    n = max(len(pa), len(pb))
    pa, pb = pa + (0,) * (n - len(pa)), pb + (0,) * (n - len(pb))
    return (pa > pb) - (pa < pb)


def major_minor(cuda: str) -> str:
    """"12.4.127" -> "12.4"; "12" -> "12.0"."""
    p = _parts(cuda)
    return f"{p[0]}.{p[1] if len(p) > 1 else 0}"


def min_driver(cuda: str) -> str:
    """Minimum NVIDIA driver for CUDA ``cuda`` (major.minor; a patch level is ignored).

    A minor release missing from the table (e.g. 12.7) takes the next newer listed release of the same
    major, so the answer is never too low. A CUDA newer than the table raises ``UsageError``.
    """
    mm = major_minor(cuda)
    known = table()["min_driver"]
    if mm in known:
        return known[mm]
    major = mm.split(".")[0]
    newer = sorted((v for v in known if v.split(".")[0] == major and compare_versions(v, mm) > 0),
                   key=_parts)
    if newer:
        return known[newer[0]]
    raise UsageError(f"CUDA {cuda} is not in the driver table ({TABLE_PATH.name}: "
                     f"{', '.join(sorted(known, key=_parts))})",
                     hint=f"add its minimum driver from {table()['source']} to installer/data/cuda_drivers.json")


def driver_floor(cuda: str) -> str:
    """Oldest driver that runs CUDA ``cuda``'s major version at all (minor-version compatibility)."""
    major = str(_parts(cuda)[0])
    floors = table()["minor_version_floor"]
    if major not in floors:
        raise UsageError(f"CUDA major {major} is not in the driver table ({TABLE_PATH.name})",
                         hint=f"add it from {table()['source']} to installer/data/cuda_drivers.json")
    return floors[major]


def driver_supports(driver: str, cuda: str) -> bool:
    """True when ``driver`` is at least ``min_driver(cuda)``."""
    return compare_versions(driver, min_driver(cuda)) >= 0


def newest_cuda_for_driver(driver: str) -> str | None:
    """The newest CUDA in the table whose minimum driver ``driver`` meets (None: older than all of them)."""
    ok = [c for c, d in table()["min_driver"].items() if compare_versions(driver, d) >= 0]
    return max(ok, key=_parts) if ok else None
