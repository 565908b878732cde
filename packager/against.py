"""`pack build --against`: what the target already has, from a server inventory (``llm-install --inventory
--json``) or from earlier bundles (a bundle directory, its first split volume, or a MANIFEST.json), so a delta
bundle leaves those artifacts out (``artifacts[].provided == "target"``, docs/delta.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from installer.bundle import inventory as inv_fmt
from installer.bundle.names import MANIFEST_NAME, PROVIDABLE_KINDS
from installer.bundle.reader import Artifact
from installer.errors import BundleError, UsageError


@dataclass
class Against:
    """The union of what the given targets hold, by artifact kind and sha256."""

    kind: str  # "inventory" or "bundle" (the first source's kind when mixed)
    base: list[dict] = field(default_factory=list)  # {name, version, manifest_sha256}
    have: dict[str, set[str]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def provides(self, a: Artifact) -> bool:
        return a.kind in PROVIDABLE_KINDS and a.sha256 in self.have.get(a.kind, set())

    def delta_info(self) -> dict:
        return {"against": self.kind, "base": self.base}


def load_against(paths: Iterable[Path]) -> Against | None:
    """Read every ``--against`` source; None when none was given. Raises UsageError for what is none of an
    inventory, a bundle directory or a MANIFEST.json."""
    paths = list(paths)
    if not paths:
        return None
    invs: list[dict] = []
    kinds: list[str] = []
    base: list[dict] = []
    for p in paths:
        inv, kind = read_source(Path(p))
        invs.append(inv)
        kinds.append(kind)
        for b in inv["bundles"]:
            if kind == "bundle" or b.get("active"):
                ref = {"name": b["name"], "version": b["version"], "manifest_sha256": b["manifest_sha256"]}
                if ref not in base:
                    base.append(ref)
    return Against(kind=kinds[0], base=base, have=inv_fmt.provided_sets(invs), sources=[str(p) for p in paths])


def read_source(p: Path) -> tuple[dict, str]:
    """One ``--against`` (or `pack diff`) input as an inventory: (inventory, "inventory" | "bundle")."""
    if p.is_dir():
        from installer.bundle import Bundle

        b = Bundle.load(p)
        return inv_fmt.from_manifest(b.manifest, b.manifest_sha256, path=str(p)), "bundle"
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise UsageError(f"{p}: no such file or directory",
                         hint="give a server inventory (`llm-install --inventory --json > FILE`), an earlier "
                         "bundle directory or its MANIFEST.json") from e
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise UsageError(f"{p}: not JSON ({e})",
                         hint="give a server inventory (`llm-install --inventory --json > FILE`), an earlier "
                         "bundle directory or its MANIFEST.json") from e
    if isinstance(obj, dict) and "inventory_version" in obj:
        return inv_fmt.load_inventory(data, source=str(p)), "inventory"
    if isinstance(obj, dict) and "format_version" in obj and "artifacts" in obj:
        import hashlib

        from installer.bundle.manifest import Manifest

        m = Manifest.from_json(data, source=str(p))
        return inv_fmt.from_manifest(m.raw, hashlib.sha256(data).hexdigest(), path=str(p)), "bundle"
    raise UsageError(f"{p}: neither a server inventory nor a {MANIFEST_NAME}",
                     hint="write the inventory on the server with `llm-install --inventory --json > FILE`")


__all__ = ["Against", "BundleError", "load_against", "read_source"]
