"""The licenses of a built environment's packages, as their own metadata gives them (for the SBOM).

Conda: the ``license`` of each package's conda-meta record (what the channel's repodata says, copied into the
prefix when py-rattler installs it). Pip: each distribution's ``METADATA`` in site-packages:
``License-Expression`` (PEP 639), else the ``License`` field when it is a short name (not a whole license
text), else its ``License ::`` classifiers. Nothing here changes the lock or the environment's content hash:
the licenses are a side record (``BuiltEnv.licenses``) that only the SBOM reads.
"""

from __future__ import annotations

from email.parser import HeaderParser
from pathlib import Path

from packager.env.facts import canonical

# a License field longer than this (or on several lines) is a license text, not a name
_MAX_NAME = 100
# the common classifiers, by their SPDX id (others are kept as names: "License :: X :: Y" -> "Y")
_CLASSIFIER_SPDX = {
    "MIT License": "MIT",
    "Apache Software License": "Apache-2.0",
    "BSD License": "BSD-3-Clause",
    "Python Software Foundation License": "PSF-2.0",
    "ISC License (ISCL)": "ISC",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "The Unlicense (Unlicense)": "Unlicense",
}


def conda_licenses(conda_meta: list[dict]) -> dict[str, str]:
    """``{package name: license}`` for the conda packages whose record names one."""
    out = {}
    for m in conda_meta:
        lic = m.get("license")
        if isinstance(lic, str) and lic.strip() and m.get("name"):
            out[str(m["name"])] = " ".join(lic.split())
    return dict(sorted(out.items()))


def metadata_licenses(text: str) -> list[str]:
    """The licenses a distribution's METADATA names: one SPDX expression, a short name, or its classifiers."""
    msg = HeaderParser().parsestr(text)
    expr = (msg.get("License-Expression") or "").strip()
    if expr:
        return [" ".join(expr.split())]
    found = []
    for c in msg.get_all("Classifier") or []:
        parts = [p.strip() for p in str(c).split("::")]
        if len(parts) >= 2 and parts[0] == "License" and parts[-1] != "OSI Approved":
            found.append(_CLASSIFIER_SPDX.get(parts[-1], parts[-1]))
    lic = str(msg.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= _MAX_NAME and lic.upper() not in ("UNKNOWN", "NONE"):
        return [lic]
    return sorted(set(found))


def pip_licenses(site: Path, pip_lock: list[dict]) -> dict[str, list[str]]:
    """``{canonical name: [licenses]}`` for the pip distributions of the lock, from their installed METADATA."""
    wanted = {canonical(e["name"]) for e in pip_lock}
    out: dict[str, list[str]] = {}
    if not site.is_dir():
        return out
    for d in sorted(site.glob("*.dist-info")):
        meta = d / "METADATA"
        try:
            text = meta.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        name = HeaderParser().parsestr(text).get("Name")
        if not name or canonical(str(name)) not in wanted:
            continue
        lic = metadata_licenses(text)
        if lic:
            out[canonical(str(name))] = lic
    return dict(sorted(out.items()))


def env_licenses(site: Path, conda_meta: list[dict], pip_lock: list[dict]) -> dict:
    """The side record ``BuiltEnv.licenses``: ``{"conda": {name: license}, "pip": {name: [licenses]}}``."""
    return {"conda": conda_licenses(conda_meta), "pip": pip_licenses(site, pip_lock)}
