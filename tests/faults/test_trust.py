"""R2 trust: only a MANIFEST.json signed by a trusted key installs, whoever starts the installer and how.

Each hostile case is built here from a table (wrong key, unsigned, edited MANIFEST, MANIFEST re-signed by an
untrusted key, zeroed signature), run through the real ``install.sh`` and through ``python -m installer``
started by hand without install.sh (on the bundle's own bare Python, whose signature check is the
``openssl`` fallback, and on the development Python with ``cryptography``). The Python installer takes
nothing on its command line that says "already verified": ``--signature-verified-by`` (any spelling) is
refused by name, and a ``--manifest`` copy is checked like the bundle's own. An older, validly signed version
replayed over a newer one is refused unless ``--allow-downgrade``. Every refusal asserts its text and that
the target tree is exactly as before.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from installer.bundle import INSTALLER_ARCHIVE, MANIFEST_NAME, SIGNATURE_NAME
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    INSTALLER_PKG,
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    make_keys,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)

INSTALL_SH = INSTALLER_PKG / "bootstrap" / "install.sh"
MISMATCH = "MANIFEST.json.sig does not match MANIFEST.json for any trusted key"
UNSIGNED = "the bundle is not signed (no MANIFEST.json.sig)"
SPOOF = "--signature-verified-by is not accepted: the installer checks MANIFEST.json.sig itself"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, t1_parts, keys) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("r2")
    made = {}
    for version, commit in (("1.0.0", "1" * 40), ("1.1.0", "2" * 40)):
        made[version] = make_bundle(
            out, BundleSpec(version=version, env=t1_parts, models=[tiny_model(commit=commit)],
                            services=[service()]), keys
        )
    return made


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("otherkey"), "other")


@pytest.fixture(scope="module")
def bare(tmp_path_factory, bundles) -> tuple[Path, Path]:
    """(the bundle's bare Python, the unpacked installer archive): what install.sh runs the installer with."""
    d = tmp_path_factory.mktemp("bare")
    m = json.loads((bundles["1.0.0"] / MANIFEST_NAME).read_bytes())
    with tarfile.open(bundles["1.0.0"] / m["runtime"]["artifact"]) as t:
        t.extractall(d / "runtime", filter="tar")
    with tarfile.open(bundles["1.0.0"] / INSTALLER_ARCHIVE) as t:
        t.extractall(d / "installer", filter="tar")
    py = d / "runtime" / m["runtime"]["python"]
    no_crypto = subprocess.run([py, "-I", "-c", "import cryptography"], capture_output=True, check=False)
    assert no_crypto.returncode != 0, "the bare runtime has no cryptography: its check is the openssl fallback"
    return py, d / "installer"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def farm(bundle: Path, dest: Path, private: tuple[str, ...] = (MANIFEST_NAME, SIGNATURE_NAME)) -> Path:
    """A copy of ``bundle`` made of hard links, but ``private`` files are real copies (safe to edit)."""
    for dirpath, _dirs, files in os.walk(bundle):
        rel = Path(dirpath).relative_to(bundle)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            (shutil.copy2 if (rel / f).as_posix() in private else os.link)(Path(dirpath, f), dest / rel / f)
    return dest


def edit_manifest(b: Path) -> bytes:
    m = b / MANIFEST_NAME
    raw = m.read_bytes().replace(b'"port": 18431', b'"port": 18439')
    assert raw != m.read_bytes()
    m.write_bytes(raw)
    return raw


def hostile(case: str, good: Path, dest: Path, keys, other) -> tuple[Path, Path, str]:
    """(bundle, the public key the operator trusts, the refusal) for one case of the table."""
    b = farm(good, dest)
    if case == "wrong-key":
        return b, other.pub, MISMATCH
    if case == "unsigned":
        (b / SIGNATURE_NAME).unlink()
        return b, keys.pub, UNSIGNED
    if case == "edited-manifest":
        edit_manifest(b)
        return b, keys.pub, MISMATCH
    if case == "resigned-by-untrusted-key":
        (b / SIGNATURE_NAME).write_bytes(other.private.sign(edit_manifest(b)))
        return b, keys.pub, MISMATCH
    if case == "zeroed-signature":
        (b / SIGNATURE_NAME).write_bytes(b"\0" * 64)
        return b, keys.pub, MISMATCH
    raise AssertionError(case)


CASES = ["wrong-key", "unsigned", "edited-manifest", "resigned-by-untrusted-key", "zeroed-signature"]


def install_sh(*args: str | Path, work: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(INSTALL_SH), *map(str, args), "--workdir", str(work)], capture_output=True,
                          text=True, timeout=600, env={**ENV, "TMPDIR": str(work)}, check=False)


def by_hand(py: Path, pkg: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m installer ARGS`` as an operator would run it, without install.sh."""
    return subprocess.run([str(py), "-m", "installer", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=pkg, check=False)


def refused(r: subprocess.CompletedProcess, want: str) -> bool:
    return r.returncode != 0 and want in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_trust_table(bundles, keys, other, bare, root, tmp_path):
    import sys

    py, pkg = bare
    before = tree_snapshot(root)
    tried = refused_n = 0
    for case in CASES:
        b, pub, want = hostile(case, bundles["1.0.0"], tmp_path / case / "demo-1.0.0", keys, other)
        runs = {
            "install.sh": install_sh("--bundle", b, "--root", root, "--pubkey", pub, work=tmp_path / case / "w"),
            "bare python": by_hand(py, pkg, "install", "--bundle", b, "--root", root, "--pubkey", pub),
            "dev python": by_hand(Path(sys.executable), INSTALLER_PKG.parent, "install", "--bundle", b, "--root",
                                  root, "--pubkey", pub),
        }
        for how, r in runs.items():
            tried += 1
            assert refused(r, want), f"{case} via {how}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
            assert tree_snapshot(root) == before, f"{case} via {how} changed the target"
            refused_n += 1
        assert not any((tmp_path / case / "w").iterdir()), "install.sh's work dir is removed"
    print(f"R2 trust: {len(CASES)} hostile signatures x 3 ways in (install.sh, python -m installer on the bare "
          f"runtime, on the dev Python): {refused_n}/{tried} refused, target unchanged")
    assert refused_n == tried == 3 * len(CASES)


@pytest.mark.parametrize("spoof", [
    ["--signature-verified-by", "FINGERPRINT"],
    ["--signature-verified-by=insecure"],
    ["--sig", "insecure"],
    ["--signature-verified", "insecure"],
])
def test_signature_verified_by_spoof_refused(spoof, bundles, keys, other, bare, root, tmp_path):
    """The old hand-over flag is refused by name, in any spelling, before anything is read or changed."""
    py, pkg = bare
    b, _pub, _want = hostile("resigned-by-untrusted-key", bundles["1.0.0"], tmp_path / "b" / "demo-1.0.0", keys,
                             other)
    spoof = [s.replace("FINGERPRINT", keys.fingerprint) for s in spoof]
    before = tree_snapshot(root)
    r = by_hand(py, pkg, "install", "--bundle", b, "--root", root, *spoof)
    assert r.returncode == 2 and SPOOF in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree_snapshot(root) == before
    r = install_sh("--bundle", b, "--root", root, "--pubkey", keys.pub, *spoof, work=tmp_path / "w")
    assert r.returncode == 2 and "unknown option: --sig" in r.stderr, r.stderr
    assert tree_snapshot(root) == before


def test_manifest_copy_is_checked_like_the_bundle(bundles, keys, bare, root, tmp_path):
    """``--manifest`` (install.sh's private copy) proves nothing by itself: its signature is checked too."""
    py, pkg = bare
    before = tree_snapshot(root)
    b = farm(bundles["1.0.0"], tmp_path / "demo-1.0.0")
    edit_manifest(b)
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    shutil.copy(b / MANIFEST_NAME, unsigned / MANIFEST_NAME)
    with_sig = farm(b, tmp_path / "with-sig")  # the edited manifest beside the original signature
    for copy, want in ((unsigned, UNSIGNED), (with_sig, MISMATCH)):
        r = by_hand(py, pkg, "install", "--bundle", b, "--manifest", copy / MANIFEST_NAME, "--root", root,
                    "--pubkey", keys.pub)
        assert refused(r, want), r.stderr
        assert tree_snapshot(root) == before
    # a verified copy that is not what the bundle holds: refused as well
    r = by_hand(py, pkg, "install", "--bundle", b, "--manifest", bundles["1.0.0"] / MANIFEST_NAME, "--root", root,
                "--pubkey", keys.pub)
    assert refused(r, "changed after it was verified"), r.stderr
    assert tree_snapshot(root) == before


def test_by_hand_on_the_bare_python_verifies_with_the_trusted_keys(bundles, keys, other, bare, root, tmp_path):
    """Without install.sh and without --pubkey: ROOT/etc/llm/trusted-keys decides (openssl fallback)."""
    py, pkg = bare
    before = tree_snapshot(root)
    r = by_hand(py, pkg, "install", "--bundle", bundles["1.0.0"], "--root", root)
    assert refused(r, "no trusted public key to check the signature with"), r.stderr
    assert tree_snapshot(root) == before
    trusted = root / "etc/llm/trusted-keys"
    trusted.mkdir(parents=True)
    shutil.copy(other.pub, trusted / "other.pub")
    before = tree_snapshot(root)
    r = by_hand(py, pkg, "install", "--bundle", bundles["1.0.0"], "--root", root)
    assert refused(r, MISMATCH) and other.fingerprint in r.stderr, r.stderr
    assert tree_snapshot(root) == before
    shutil.copy(keys.pub, trusted / "build.pub")
    r = by_hand(py, pkg, "install", "--bundle", bundles["1.0.0"], "--root", root)
    assert r.returncode == 0, r.stderr
    assert f"signature verified with key {keys.fingerprint}" in r.stdout and "demo 1.0.0 is active" in r.stdout


def test_insecure_only_when_the_operator_says_so(bundles, keys, root, tmp_path):
    b = farm(bundles["1.0.0"], tmp_path / "demo-1.0.0")
    (b / SIGNATURE_NAME).unlink()
    before = tree_snapshot(root)
    r = install_sh("--bundle", b, "--root", root, work=tmp_path / "w")
    assert refused(r, UNSIGNED) and tree_snapshot(root) == before, r.stderr
    r = install_sh("--bundle", b, "--root", root, "--insecure", work=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    # both halves say so: the bash check and the Python installer's own
    assert "WARNING: the bundle is not signed; installing it anyway (--insecure)" in r.stderr
    assert "warning: --insecure: installing without a valid signature" in r.stderr
    assert "signature NOT checked (--insecure)" in r.stdout


def test_older_version_replayed_over_newer_is_refused(bundles, keys, root, tmp_path):
    r = install_sh("--bundle", bundles["1.1.0"], "--root", root, "--pubkey", keys.pub, work=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    before = tree_snapshot(root)
    r = install_sh("--bundle", bundles["1.0.0"], "--root", root, "--pubkey", keys.pub, work=tmp_path / "w")
    assert refused(r, "demo 1.0.0 is older than the installed 1.1.0"), r.stderr
    assert "--allow-downgrade" in r.stderr
    assert tree_snapshot(root) == before
    r = install_sh("--bundle", bundles["1.0.0"], "--root", root, "--pubkey", keys.pub, "--allow-downgrade",
                   work=tmp_path / "w")
    assert r.returncode == 0 and "demo 1.0.0 is active" in r.stdout, r.stderr


def test_bootstrap_handover_spoof_refused(bundles, keys, bare, root, tmp_path):
    """``--bootstrap`` (whose unpacked runtime and installer are kept and later run by llm-install) is taken
    only as install.sh makes it: private to this user, with the verified archives' exact bytes."""
    py, pkg = bare
    good = bundles["1.0.0"]
    m = json.loads((good / MANIFEST_NAME).read_bytes())
    rt = m["runtime"]["artifact"]
    before = tree_snapshot(root)
    fake = tmp_path / "fake"
    (fake / "runtime/bin").mkdir(parents=True)
    (fake / "runtime/bin/python3.11").write_text("#!/bin/sh\necho pwned\n")
    (fake / "verified/runtime").mkdir(parents=True)
    cases = [(0o755, "not a private directory of this user")]
    shutil.copy(good / INSTALLER_ARCHIVE, fake / "verified" / INSTALLER_ARCHIVE)
    cases.append((0o700, f"{rt} is not there"))
    for mode, want in cases:
        fake.chmod(mode)
        r = by_hand(py, pkg, "install", "--bundle", good, "--root", root, "--pubkey", keys.pub, "--bootstrap", fake)
        assert refused(r, f"--bootstrap {fake}: {want}"), r.stderr
        assert tree_snapshot(root) == before
    (fake / "verified" / rt).write_bytes(b"not the runtime")
    r = by_hand(py, pkg, "install", "--bundle", good, "--root", root, "--pubkey", keys.pub, "--bootstrap", fake)
    assert refused(r, f"--bootstrap {fake}: {rt} is not the one MANIFEST.json lists"), r.stderr
    assert tree_snapshot(root) == before
