"""install.sh cannot import installer/bundle/names.py: what it spells out itself is checked against it here.

Two dependencies of the bootstrap on the Python side, both checked:
- every on-disk name the bootstrap uses (bundle files, volumes, trusted keys, install paths) is the one in
  ``installer.bundle.names``;
- install.sh reads MANIFEST.json and SPLIT.json with line-based readers (``json_top_field``, ``json_top_scalar``,
  ``json_top_list``, ``manifest_artifact``) that rely on the layout of ``canonical_json`` (indent=1, sorted
  keys, one key per line). Each field install.sh reads is read here by the bash readers from canonical JSON
  and compared with Python's value; a new read in install.sh fails this test until it is added below.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from installer.bundle import canonical_json, names

INSTALL_SH = Path(names.__file__).resolve().parent.parent / "bootstrap" / "install.sh"

# the names of installer/bundle/names.py that install.sh spells out (relative to ROOT where it joins them)
BOOTSTRAP_NAMES = {
    "MANIFEST_NAME": names.MANIFEST_NAME,
    "SIGNATURE_NAME": names.SIGNATURE_NAME,
    "INSTALL_SH": names.INSTALL_SH,
    "SPLIT_INFO": names.SPLIT_INFO,
    "VOLUME_INDEX": names.VOLUME_INDEX,
    "PIECE_SUFFIX": names.PIECE_SUFFIX,
    "TRUSTED_KEYS": names.TRUSTED_KEYS,
    "STATE_DIR": names.STATE_DIR,
    "STAGING": names.STAGING.lstrip("/"),
    "INSTALLERS": names.INSTALLERS.lstrip("/"),
    "RUNTIMES": names.RUNTIMES.lstrip("/"),
    "WRAPPER": names.WRAPPER,
}

SHA = "ab" * 32
MANIFEST = {
    "format_version": names.FORMAT_VERSION,
    "bundle": {"name": "tiny", "version": "1.0.0", "created": "2026-01-01T00:00:00Z"},
    "artifacts": [
        {"path": names.INSTALLER_ARCHIVE, "size": 10, "sha256": "cd" * 32, "kind": "installer"},
        {"path": names.INSTALL_SH, "size": 20, "sha256": SHA, "kind": "bootstrap"},
        {"path": names.runtime_artifact("t1"), "size": 30, "sha256": "ef" * 32, "kind": "runtime"},
    ],
    "installer": {"artifact": names.INSTALLER_ARCHIVE},
    "runtime": {"artifact": names.runtime_artifact("t1"), "python": "bin/python3"},
    "services": [{"name": "tiny", "port": 8000}],
}
SPLIT = {"format": 1, "volumes": 2, "volume_names": ["b.vol01", "b.vol02"],
         "split_files": ["envs/t1.tar.zst", "models/tiny/model.safetensors"]}

# (reader, file, args) -> expected output: every read install.sh makes
READS = {
    ("json_top_scalar", "manifest", ("format_version",)): str(names.FORMAT_VERSION),
    ("json_top_field", "manifest", ("bundle", "name")): "tiny",
    ("json_top_field", "manifest", ("bundle", "version")): "1.0.0",
    ("json_top_field", "manifest", ("installer", "artifact")): names.INSTALLER_ARCHIVE,
    ("json_top_field", "manifest", ("runtime", "artifact")): names.runtime_artifact("t1"),
    ("json_top_field", "manifest", ("runtime", "python")): "bin/python3",
    ("manifest_artifact", "manifest", (names.INSTALL_SH,)): f"{SHA} 20",
    ("json_top_scalar", "info", ("volumes",)): "2",
    ("json_top_list", "info", ("volume_names",)): "b.vol01\nb.vol02",
    ("json_top_list", "info", ("split_files",)): "envs/t1.tar.zst\nmodels/tiny/model.safetensors",
}


def test_every_bootstrap_name_is_spelled_as_in_names_py() -> None:
    text = INSTALL_SH.read_text(encoding="utf-8")
    missing = {k: v for k, v in BOOTSTRAP_NAMES.items() if v not in text}
    assert not missing, f"install.sh does not use these names of installer/bundle/names.py: {missing}"


def test_every_read_of_install_sh_is_covered_here() -> None:
    text = INSTALL_SH.read_text(encoding="utf-8")
    calls = set()
    for m in re.finditer(r"\b(json_top_field|json_top_scalar|json_top_list|manifest_artifact) "
                         r"\"\$(manifest|info)\" ([^)|;>]*)", text):
        args = tuple(a.strip('"') for a in m.group(3).split())
        calls.add((m.group(1), m.group(2), args))
    assert len(calls) >= len(READS), "install.sh's reads were not found: has their form changed?"
    covered = set(READS)
    # manifest_artifact "$manifest" "$rel" (every executed file) is the general form of the install.sh read
    calls.discard(("manifest_artifact", "manifest", ("$rel",)))
    assert calls <= covered, f"install.sh reads fields this test does not check: {sorted(calls - covered)}"


def test_bash_readers_agree_with_canonical_json(tmp_path: Path) -> None:
    files = {"manifest": tmp_path / names.MANIFEST_NAME, "info": tmp_path / names.SPLIT_INFO}
    files["manifest"].write_bytes(canonical_json(MANIFEST))
    files["info"].write_bytes(canonical_json(SPLIT))
    for (reader, which, args), want in READS.items():
        r = subprocess.run(["bash", "-c", 'source "$1"; shift; "$@"', "t", str(INSTALL_SH), reader,
                            str(files[which]), *args], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, (reader, args, r.stderr)
        assert r.stdout.rstrip("\n") == want, (reader, args, r.stdout)
