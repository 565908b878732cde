"""Per-host overrides of a bundle's services: ``install.sh --overrides FILE`` (``llm-install install|check``).

A fleet serves one signed bundle on many servers whose GPUs, ports and key files differ. Rebuilding (and
re-signing) a bundle per server would defeat the point, so a small JSON file on the server changes a few
fields of the services the bundle declares, e.g.::

    {"services": {"tiny": {"port": 8001, "host": "0.0.0.0", "gpus": [0, 1],
                           "api_key_file": "/etc/llm/keys/tiny.key"}}}

Only the fields in :data:`OVERRIDABLE` may be changed, only of services the bundle has; the merged services go
through the very rules MANIFEST.json's go through (``ServiceRecord``, port conflicts), so an override can
never produce what ``pack build`` would have refused. The signed MANIFEST.json is never changed: the
overrides become part of the installed version's identity (:func:`identity_suffix`) and are kept beside its
record, so a second run with the same file changes nothing and a different file is a new version to switch
to (and to roll back from).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from installer.bundle.manifest import Manifest
from installer.errors import BundleError, UsageError

OVERRIDES_NAME = "overrides.json"  # kept beside an installed version's MANIFEST.json record
OVERRIDABLE = ("host", "port", "gpus", "api_key_file", "tensor_parallel_size", "gpu_memory_utilization",
               "max_model_len", "node")  # node: this server's part in a service that spans nodes (cluster.py)
MAX_BYTES = 64 * 1024


def load(path: Path) -> dict:
    """Read and shape-check an overrides file; returns its canonical form (``{"services": {...}}``)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--overrides {path}: cannot read it ({e.strerror or e})",
                         hint="pass a JSON file readable by root") from e
    return parse(raw, source=f"--overrides {path}")


def parse(raw: bytes, *, source: str) -> dict:
    if len(raw) > MAX_BYTES:
        raise UsageError(f"{source}: larger than {MAX_BYTES} bytes", hint="it holds a few service fields only")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{source}: not valid JSON ({e})",
                         hint='write it as {"services": {"NAME": {"port": 8001}}}') from e
    if not isinstance(obj, dict) or set(obj) - {"services"}:
        raise UsageError(f"{source}: expected an object with only a \"services\" key",
                         hint='write it as {"services": {"NAME": {"port": 8001}}}')
    services = obj.get("services", {})
    if not isinstance(services, dict):
        raise UsageError(f"{source}: services: expected an object of service name -> fields")
    for name, fields in services.items():
        if not isinstance(fields, dict):
            raise UsageError(f"{source}: services.{name}: expected an object of fields")
        bad = sorted(set(fields) - set(OVERRIDABLE))
        if bad:
            raise UsageError(f"{source}: services.{name}: {', '.join(bad)} cannot be overridden",
                             hint=f"only {', '.join(OVERRIDABLE)} can be set per server")
    return {"services": {n: dict(f) for n, f in services.items()}}


def canonical(overrides: Mapping) -> bytes:
    return (json.dumps(overrides, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def is_empty(overrides: Mapping | None) -> bool:
    return not overrides or not any(overrides.get("services", {}).values())


def identity_suffix(manifest_bytes: bytes, overrides: Mapping | None) -> str:
    """The 12 hex digits of an installed version's id: the manifest's sha256, or with overrides, the sha256
    of the manifest and the canonical overrides (so the same file gives the same id on every run)."""
    h = hashlib.sha256(manifest_bytes)
    if not is_empty(overrides):
        assert overrides is not None
        h.update(b"\0overrides\0" + canonical(overrides))
    return h.hexdigest()[:12]


def apply(manifest: Mapping, overrides: Mapping | None, *, source: str) -> tuple[dict, Manifest | None]:
    """The manifest with the overrides merged into its services, validated by the MANIFEST rules.

    Returns ``(dict, records)``; ``records`` is None when there is nothing to override.
    """
    if is_empty(overrides):
        return dict(manifest), None
    assert overrides is not None
    merged = copy.deepcopy(dict(manifest))
    by_name = {s.get("name"): s for s in merged.get("services") or []}
    for name, fields in overrides["services"].items():
        if name not in by_name:
            have = ", ".join(sorted(str(n) for n in by_name)) or "none"
            raise UsageError(f"{source}: services.{name}: the bundle has no such service (it has: {have})",
                             hint="name a service of the bundle (pack inspect BUNDLE lists them)")
        by_name[name].update(fields)
    try:
        records = Manifest.from_dict(merged, source=source)
    except BundleError as e:
        raise UsageError(e.message, hint="fix the override; the field rules are those of MANIFEST services "
                                        "(docs/bundle-format.md)") from e
    return merged, records


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
