"""install.sh cannot import installer/bundle/names.py or a JSON parser: what it spells out and reads itself is
checked against the Python side here.

- every on-disk name of ``installer.bundle.names`` is either one the bootstrap uses, and then spelled so in
  install.sh, or listed here as one it does not need (a new name fails until it is put on one side);
- install.sh reads MANIFEST.json and SPLIT.json with its own JSON reader (``json_load``, then ``json_value``,
  ``json_list``, ``json_pieces``, ``manifest_artifact``), which does not depend on how the JSON is laid out. Each
  field install.sh reads is read here by the bash reader from canonical JSON and from the same document written
  other ways (compact, indented, CRLF, keys in another order, ``ensure_ascii``) and compared with Python's value;
  a new read in install.sh fails this test until it is added below. What is not JSON is refused.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

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
    "INSTALL_DIR": names.INSTALL_DIR.lstrip("/"),
    "INSTALLERS": names.INSTALLERS.lstrip("/"),
    "RUNTIMES": names.RUNTIMES.lstrip("/"),
    "PROVIDED": names.PROVIDED,
    "WRAPPER": names.WRAPPER,
}
# the names the bootstrap does not spell out, and why
NOT_BOOTSTRAP_NAMES = {
    "INSTALLER_ARCHIVE": "read from MANIFEST.json (installer.artifact)",
    "RUNTIME_DIR": "the runtime archive is read from MANIFEST.json (runtime.artifact)",
    "SBOM_NAME": "the SBOM is for reviewers (`pack sbom`): nothing on the target reads it",
    "ENVS_DIR": "environments are the Python installer's", "MODELS_DIR": "models are the Python installer's",
    "VOLUME_PREFIX": "volume names come from SPLIT.json (checked by pattern)",
    "ARTIFACT_KINDS": "the bootstrap looks artifacts up by path", "BUFSIZE": "Python's read size",
    "SYSTEM_PATH": "the PATH of services and preflight probes (the Python side)",
    "STATE_FILE": "state is the Python installer's", "LOCK_FILE": "the lock is the Python installer's",
    "ENVS": "the Python installer's", "MODELS": "the Python installer's", "HF_CACHES": "the Python installer's",
    "BUNDLE_RECORDS": "the Python installer's", "JOURNAL": "the Python installer's",
    "UNIT_VERSIONS": "systemd units are the Python installer's", "LINES": "the Python installer's",
    "ENV_MARKER": "the Python installer's",
    "PROVIDABLE_KINDS": "the MANIFEST rules (Python) check which kinds a delta may leave out",
}

SHA = "ab" * 32
MANIFEST = {
    "format_version": names.FORMAT_VERSION,
    # a free-text field holding JSON-looking text, quotes and backslashes: it must not be read as structure
    "bundle": {"name": "tiny", "version": "1.0.0",
               "description": 'x", "installer": {"artifact": "evil.tar.gz"}, "y": "\\", \\\\"} ] \u00e9\u2028'},
    "artifacts": [
        {"path": names.INSTALLER_ARCHIVE, "size": 10, "sha256": "cd" * 32, "kind": "installer"},
        {"path": names.INSTALL_SH, "size": 20, "sha256": SHA, "kind": "bootstrap"},
        # a delta bundle leaves the runtime to the target: install.sh reads "provided" of its entry
        {"path": names.runtime_artifact("t1"), "size": 30, "sha256": "ef" * 32, "kind": "runtime",
         "provided": names.PROVIDED},
    ],
    "installer": {"artifact": names.INSTALLER_ARCHIVE},
    "runtime": {"artifact": names.runtime_artifact("t1"), "python": "bin/python3"},
    # nested fields named like the ones the bootstrap reads: they are other paths
    "models": [{"name": "m", "config": {"installer": {"artifact": "evil"}, "artifacts": [{"path": "install.sh",
                                                                                        "sha256": "0" * 64}]}}],
    "services": [{"name": "tiny", "port": 8000, "gpus": [], "env": {}}],
}
SPLIT = {"format": 1, "volumes": 2, "volume_names": ["b.vol01", "b.vol02"],
         "pieces": [{"file": "installer.tar.gz", "name": "installer.tar.gz", "volume": 1, "offset": 0, "size": 10},
                    {"file": "envs/t1.tar.zst", "name": "envs/t1.tar.zst.part0001", "volume": 1, "offset": 0,
                     "size": 700},
                    {"file": "envs/t1.tar.zst", "name": "envs/t1.tar.zst.part0002", "volume": 2, "offset": 700,
                     "size": 5},
                    {"file": "models/m/a b.json", "name": "models/m/a b.json", "volume": 2, "offset": 0,
                     "size": 0}]}

# (reader, file, args) -> expected output: every read install.sh makes
READS = {
    ("json_value", "manifest", ("format_version",)): str(names.FORMAT_VERSION),
    ("json_value", "manifest", ("bundle.name",)): "tiny",
    ("json_value", "manifest", ("bundle.version",)): "1.0.0",
    ("json_value", "manifest", ("installer.artifact",)): names.INSTALLER_ARCHIVE,
    ("json_value", "manifest", ("runtime.artifact",)): names.runtime_artifact("t1"),
    ("json_value", "manifest", ("runtime.python",)): "bin/python3",
    ("manifest_artifact", "manifest", (names.INSTALL_SH,)): f"{SHA} 20",
    ("manifest_artifact", "manifest", (names.runtime_artifact("t1"),)): f"{'ef' * 32} 30 {names.PROVIDED}",
    ("json_value", "info", ("volumes",)): "2",
    ("json_list", "info", ("volume_names",)): "b.vol01\nb.vol02",
    ("json_pieces", "info", ()): "installer.tar.gz\tinstaller.tar.gz\t1\t0\t10\n"
                                 "envs/t1.tar.zst\tenvs/t1.tar.zst.part0001\t1\t0\t700\n"
                                 "envs/t1.tar.zst\tenvs/t1.tar.zst.part0002\t2\t700\t5\n"
                                 "models/m/a b.json\tmodels/m/a b.json\t2\t0\t0",
}


def _reversed_keys(obj):
    if isinstance(obj, dict):
        return {k: _reversed_keys(obj[k]) for k in reversed(sorted(obj))}
    if isinstance(obj, list):
        return [_reversed_keys(v) for v in obj]
    return obj


LAYOUTS = {
    "canonical": canonical_json,
    "compact": lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode(),
    "indent4-crlf": lambda o: json.dumps(o, indent=4, ensure_ascii=False).replace("\n", "\r\n").encode(),
    "tabs-ascii": lambda o: json.dumps(o, indent="\t", ensure_ascii=True).encode(),
    "reversed-keys-spaced": lambda o: json.dumps(_reversed_keys(o), separators=(" , ", " : "),
                                                 ensure_ascii=False).encode(),
}


def _bash(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", 'set -eu; source "$1"; shift; "$@"', "t", str(INSTALL_SH), *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_every_name_of_names_py_is_classified() -> None:
    public = {k for k, v in vars(names).items() if k.isupper() and not callable(v)}
    public.discard("FORMAT_VERSION")  # checked on its own below
    assert public == set(BOOTSTRAP_NAMES) | set(NOT_BOOTSTRAP_NAMES), (
        f"say whether install.sh uses these names of installer/bundle/names.py: "
        f"{sorted(public - set(BOOTSTRAP_NAMES) - set(NOT_BOOTSTRAP_NAMES))}; gone: "
        f"{sorted((set(BOOTSTRAP_NAMES) | set(NOT_BOOTSTRAP_NAMES)) - public)}")
    assert not set(BOOTSTRAP_NAMES) & set(NOT_BOOTSTRAP_NAMES)


def test_every_bootstrap_name_is_spelled_as_in_names_py() -> None:
    text = INSTALL_SH.read_text(encoding="utf-8")
    missing = {k: v for k, v in BOOTSTRAP_NAMES.items() if v not in text}
    assert not missing, f"install.sh does not use these names of installer/bundle/names.py: {missing}"
    # the install paths it joins to ROOT: the runtime and the installer an earlier install kept
    for where in (names.RUNTIMES, names.INSTALLERS):
        assert f"/{where.lstrip('/')}/current" in text, where
    assert f'format_version)" = {names.FORMAT_VERSION} ]' in text


def test_every_read_of_install_sh_is_covered_here() -> None:
    text = INSTALL_SH.read_text(encoding="utf-8")
    calls = set()
    for m in re.finditer(r"\b(json_value|json_list|json_pieces|manifest_artifact) \"\$(manifest|info)\"([^)|;>]*)",
                         text):
        args = tuple(a.strip('"') for a in m.group(3).split())
        calls.add((m.group(1), m.group(2), args))
    assert len(calls) >= len(READS), "install.sh's reads were not found: has their form changed?"
    covered = set(READS)
    # manifest_artifact "$manifest" "$rel" (every executed file) is the general form of the install.sh read
    calls.discard(("manifest_artifact", "manifest", ("$rel",)))
    calls.discard(("manifest_artifact", "manifest", ("$rt_art",)))  # its runtime form is READS' runtime entry
    assert calls <= covered, f"install.sh reads fields this test does not check: {sorted(calls - covered)}"
    # the two files are loaded (and a broken one refused) before they are read
    assert 'json_load "$manifest" || die' in text and 'json_load "$info" || die' in text


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bash_reader_agrees_with_python_whatever_the_layout(tmp_path: Path, layout: str) -> None:
    files = {"manifest": tmp_path / names.MANIFEST_NAME, "info": tmp_path / names.SPLIT_INFO}
    files["manifest"].write_bytes(LAYOUTS[layout](MANIFEST))
    files["info"].write_bytes(LAYOUTS[layout](SPLIT))
    assert json.loads(files["manifest"].read_bytes()) == MANIFEST
    for (reader, which, args), want in READS.items():
        r = _bash(reader, files[which], *args)
        assert r.returncode == 0, (layout, reader, args, r.stderr)
        assert r.stdout.rstrip("\n") == want, (layout, reader, args, r.stdout)
    # a path not listed is not found, and nested look-alikes are not taken for the top-level fields
    assert _bash("manifest_artifact", files["manifest"], "evil.tar.gz").returncode == 1
    r = _bash("json_value", files["manifest"], "models[0].config.installer.artifact")
    assert r.returncode == 0 and r.stdout == "evil"


@pytest.mark.parametrize("text, why", [
    ('{"a": 1, "a": 2}', "a is given twice"),
    ('{"a": 1,}', "unexpected '}'"),
    ('{"a" "b"}', "unexpected string 'b'"),
    ('{"a": [1 2]}', "unexpected '2'"),
    ('{"a": [1, 2}', "'}' closes a container it does not belong to"),
    ('{"a": "b', "does not end"),
    ('{"a": "b"}"', "ends inside or just after a string"),
    ('{"a": "b"}\0{"c": 1}', "a NUL byte"),
    ('{"a": "b"} {}', "unexpected '{'"),
    ('{"a": tru e}', "'tru' is not a JSON value"),
    ('{"a": 01}', "'01' is not a JSON value"),
    ('{"a": NaN}', "'NaN' is not a JSON value"),
    ('{"a": "x\ny"}', "a control character"),
    ('{"a": "x\\"}', "does not end"),
    ('{"": 1}', "an empty key at the top level"),
    ('{"a.b": 1, "a": {"b": 2}}', "a.b is given twice"),
    ('{"a": {', "the document ends early"),
    ("", "the document ends early"),
])
def test_what_is_not_json_is_refused(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "x.json"
    f.write_text(text)
    r = subprocess.run(["bash", "-c", 'source "$1"; json_load "$2" && echo loaded; echo "$JSON_ERROR"', "t",
                        str(INSTALL_SH), str(f)], capture_output=True, text=True, timeout=60, check=False)
    assert "loaded" not in r.stdout and why in r.stdout, r.stdout + r.stderr
