"""Write small pure-Python wheels for the pip-layer tests (installed with --no-index --find-links)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest_dir: Path, name: str, version: str, modules: dict[str, str],
                console_scripts: dict[str, str] | None = None, requires: list[str] | None = None,
                metadata: list[tuple[str, str]] | None = None) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``dest_dir``; ``modules`` maps paths to source text,
    ``metadata`` adds METADATA fields (e.g. ``("License-Expression", "MIT")``)."""
    dist = name.replace("-", "_")
    di = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {p: s.encode() for p, s in modules.items()}
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires or [])
    meta += "".join(f"{k}: {v}\n" for k, v in metadata or [])
    files[f"{di}/METADATA"] = meta.encode()
    files[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: llm-pack-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if console_scripts:
        eps = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in console_scripts.items())
        files[f"{di}/entry_points.txt"] = eps.encode()
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items()) + f"{di}/RECORD,,\n"
    files[f"{di}/RECORD"] = record.encode()
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(files):
            info = zipfile.ZipInfo(p, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, files[p])
    return path
