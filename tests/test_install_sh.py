"""install.sh, run with bash from real bundles into a staging tree (--root): signature and hash checks with
openssl/sha256sum, refusals that change nothing, unsafe bootstrap archives, split volumes, and rollback,
status and uninstall from the installed copy after the bundle is gone."""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from installer.bundle import SIGNATURE_NAME
from packager.split import split_bundle
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.faults.test_archives import HOSTILE
from tests.installer_fixtures import (
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    make_keys,
    models_only_bundle,
    run_command,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)


def sh(script: Path, *args: str | Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(script.parent.parent)}
    return run_command(["bash", script, *args], check=check, timeout=600, env=env)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shbundles")


@pytest.fixture(scope="module")
def good(out, t1_parts, keys) -> Path:
    return make_bundle(
        out, BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model()], services=[service()]), keys
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def copy_bundle(src: Path, tmp: Path) -> Path:
    dst = tmp / "b" / src.name
    shutil.copytree(src, dst)
    return dst


def test_install_with_trusted_keys_dir_then_lifecycle_without_the_bundle(
    root, good, keys, tmp_path, out, t1_parts
):
    trusted = root / "etc/llm/trusted-keys"
    trusted.mkdir(parents=True)
    shutil.copy(keys.pub, trusted / "build.pub")
    before = tree_snapshot(root)
    b = copy_bundle(good, tmp_path)
    r = sh(b / "install.sh", "--root", root, check=True)
    assert f"verified with key {keys.fingerprint}" in r.stderr + r.stdout
    assert "demo 1.0.0 is active" in r.stdout
    assert (root / "usr/local/sbin/llm-install").is_file()
    assert (root / "opt/llm/runtime/current/bin/python3.11").exists()
    assert not list(tmp_path.glob("llm-install.*")), "the private work dir is removed"
    again = sh(b / "install.sh", "--root", root, check=True)
    assert "nothing changed" in again.stdout
    v2 = make_bundle(
        out,
        BundleSpec(version="1.1.0", env=t1_parts, models=[tiny_model(commit="2" * 40)], services=[service()]),
        keys,
    )
    sh(copy_bundle(v2, tmp_path / "v2") / "install.sh", "--root", root, check=True)
    shutil.rmtree(tmp_path / "b")
    shutil.rmtree(tmp_path / "v2")  # the USB disks are gone: the installed copy does the rest
    installed = root / "opt/llm/installer/current/install.sh"
    st = json.loads(sh(installed, "--status", "--json", "--root", root, check=True).stdout)
    assert st["bundles"][0]["active"] == "1.1.0" and st["bundles"][0]["previous"] == "1.0.0"
    r = sh(installed, "--rollback", "--root", root, check=True)
    assert "1.1.0 -> 1.0.0" in r.stdout
    r = sh(installed, "--uninstall", "--root", root, check=True)
    assert tree_snapshot(root) == before


@pytest.mark.parametrize(
    "case",
    [
        "tampered-manifest",
        "unknown-key",
        "unsigned",
        "bad-sig-file",
        "installer-hash",
        "runtime-hash",
        "install-sh-hash",
    ],
)
def test_refused_and_nothing_changed(case, root, good, keys, tmp_path):
    b = copy_bundle(good, tmp_path)
    pub = keys.pub
    if case == "tampered-manifest":
        m = b / "MANIFEST.json"
        m.write_text(m.read_text().replace('"port": 18431', '"port": 18439'))
        want = "does not match MANIFEST.json for any trusted key"
    elif case == "unknown-key":
        pub = make_keys(tmp_path / "other", "other").pub
        want = "does not match MANIFEST.json for any trusted key"
    elif case == "unsigned":
        (b / SIGNATURE_NAME).unlink()
        want = "not signed"
    elif case == "bad-sig-file":
        (b / SIGNATURE_NAME).write_bytes(b"\0" * 64)
        want = "does not match"
    else:
        rel = {
            "installer-hash": "installer.tar.gz",
            "runtime-hash": "runtime/t1.tar.gz",
            "install-sh-hash": "install.sh",
        }[case]
        p = b / rel
        data = bytearray(p.read_bytes())
        if rel == "install.sh":
            # the script that runs is the changed one: change a comment, so it still runs and must find its
            # own bytes differ from the signed MANIFEST (a flip in its code can make it do anything)
            at = data.index(b"verify, check and install") + len(b"verify, check and instal")
        else:
            at = len(data) // 2
        data[at] ^= 0x01
        p.write_bytes(bytes(data))
        want = f"{rel}: sha256 mismatch"
    before = tree_snapshot(root)
    r = sh(b / "install.sh", "--root", root, "--pubkey", pub)
    assert r.returncode != 0, r.stdout
    assert want in r.stderr
    assert tree_snapshot(root) == before
    if case == "unsigned":
        r = sh(b / "install.sh", "--root", root, "--insecure", check=True)
        assert "NOT checked (--insecure)" in r.stderr


def _evil_installer(members: list) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo("installer/cli.py")
        ti.size = 0
        t.addfile(ti, io.BytesIO(b""))
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


EVIL = HOSTILE  # the one table of hostile tar cases (tests/faults/test_archives.py), here through real runs


@pytest.mark.parametrize("case", sorted(EVIL))
def test_unsafe_bootstrap_archive_refused_before_extraction(case, root, t1_parts, keys, tmp_path):
    """A signed bundle whose installer archive is hostile (hash matches): install.sh refuses to unpack it."""
    from installer.bundle import INSTALLER_ARCHIVE, Bundle, canonical_json

    b = make_bundle(tmp_path / "o", BundleSpec(version="9", env=t1_parts, models=[tiny_model()]), keys)
    members, want = EVIL[case]
    data = _evil_installer(members)
    (b / INSTALLER_ARCHIVE).write_bytes(data)
    import hashlib

    m = json.loads((b / "MANIFEST.json").read_bytes())
    for a in m["artifacts"]:
        if a["path"] == INSTALLER_ARCHIVE:
            a["sha256"], a["size"] = hashlib.sha256(data).hexdigest(), len(data)
    raw = canonical_json(m)
    (b / "MANIFEST.json").write_bytes(raw)
    (b / SIGNATURE_NAME).write_bytes(keys.private.sign(raw))
    Bundle.load(b).check_files()
    before = tree_snapshot(root)
    r = sh(b / "install.sh", "--root", root, "--pubkey", keys.pub, "--workdir", tmp_path / "w")
    assert r.returncode != 0 and want in r.stderr, r.stderr
    assert f"{INSTALLER_ARCHIVE}: refusing member" in r.stderr
    assert tree_snapshot(root) == before
    assert not Path("/tmp/llm-r3-abs").exists()
    assert not list((tmp_path / "w").iterdir()), "the work dir is cleaned up"


def test_split_volumes_read_in_place_and_verified(root, good, keys, tmp_path):
    vols = split_bundle(good, tmp_path / "usb", "6M")
    assert len(vols) >= 4
    r = sh(vols[0] / "install.sh", "--root", root, "--pubkey", keys.pub, check=True)
    assert f"volume {len(vols)}/{len(vols)}" in r.stderr and "demo 1.0.0 is active" in r.stdout
    assert "nothing is joined" in r.stderr and f"from {len(vols)} volumes in place" in r.stdout
    assert "I/O of this install" in r.stderr


def test_volumes_elsewhere_and_a_corrupted_volume_named(root, good, keys, tmp_path):
    vols = split_bundle(good, tmp_path / "usb", "6M")
    # the other disks are mounted somewhere else
    media = tmp_path / "media"
    for v in vols[1:]:
        shutil.move(v, media / v.name[-5:] / v.name)
    r = sh(vols[0] / "install.sh", "--root", root, "--pubkey", keys.pub)
    assert r.returncode != 0 and f"volume 2 of {len(vols)}" in r.stderr and "--volumes" in r.stderr
    # a flipped byte in one piece of volume 3
    v3 = media / "vol03" / vols[2].name
    piece = next(p for p in sorted(v3.rglob("*")) if p.is_file() and p.name != "VOLUME.sha256")
    data = bytearray(piece.read_bytes())
    data[len(data) // 3] ^= 0x10
    piece.write_bytes(bytes(data))
    before = tree_snapshot(root)
    r = sh(
        vols[0] / "install.sh", "--root", root, "--pubkey", keys.pub, "--volumes", *sorted(media.iterdir())
    )
    rel = piece.relative_to(v3).as_posix()
    assert r.returncode != 0 and f"volume 3 ({v3}): {rel} is corrupted" in r.stderr, r.stderr
    assert tree_snapshot(root) == before
    data[len(data) // 3] ^= 0x10
    piece.write_bytes(bytes(data))
    sh(
        vols[0] / "install.sh",
        "--root",
        root,
        "--pubkey",
        keys.pub,
        "--volumes",
        *sorted(media.iterdir()),
        check=True,
    )


def test_check_dry_run_and_model_only_bundle_on_the_installed_runtime(root, good, keys, tmp_path, out):
    r = sh(good / "install.sh", "--check", "--root", root, "--pubkey", keys.pub)
    assert r.returncode == 0 and "preflight:" in r.stdout
    assert not (root / "opt").exists()
    r = sh(good / "install.sh", "--dry-run", "--root", root, "--pubkey", keys.pub, check=True)
    assert "dry run: nothing was changed" in r.stdout and not (root / "opt").exists()
    mo = models_only_bundle(out, keys)
    r = sh(mo / "install.sh", "--root", root, "--pubkey", keys.pub)
    assert r.returncode != 0 and "carries no Python and none was installed before" in r.stderr
    sh(good / "install.sh", "--root", root, "--pubkey", keys.pub, check=True)
    r = sh(mo / "install.sh", "--root", root, "--pubkey", keys.pub, check=True)
    assert "using the installer runtime of an earlier install" in r.stderr and "extra 1 is active" in r.stdout


def test_os_errors_are_one_message_without_a_traceback(tmp_path, keys):
    """Disk full and a file in the way: what failed, where, how to fix it; exit 1; no traceback."""
    import os

    from tests.installer_fixtures import run_installer

    b = make_bundle(
        tmp_path / "o",
        BundleSpec(name="osx", version="1", env=None, models=[tiny_model(weights=os.urandom(512 << 10))],
                   services=[service(environment=None)]),
        keys,
    )
    skip = "gpus,gpu-memory,compute-capability,driver,disk"
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    r = run_installer("install", "--bundle", b, "--root", in_the_way, "--pubkey", keys.pub, "--skip-check", skip,
                      check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: File exists: {in_the_way}" in r.stderr and "a file is in the way" in r.stderr
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=False,
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (small / "etc").mkdir()
        r = run_installer("install", "--bundle", b, "--root", small, "--pubkey", keys.pub, "--skip-check", skip,
                          check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        # the installer names the step when it knows it; any other OSError gets the generic message
        assert r.stderr.startswith("error: ") and "No space left on device" in r.stderr, r.stderr
        assert "hint: free space" in r.stderr and str(small) in r.stderr
        assert not (small / "opt").exists() or not any((small / "opt").rglob("*.safetensors"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("volume_names", "../../elsewhere", "unsafe volume name '../../elsewhere'"),
        ("volume_names", "sub/vol02", "unsafe volume name 'sub/vol02'"),
        ("pieces.name", "../../etc/passwd", "unsafe piece name '../../etc/passwd'"),
        ("pieces.file", "/etc/passwd", "unsafe piece name '/etc/passwd'"),
        ("pieces.name", "installer.tar.gz.part0001/../../x", "unsafe piece name 'installer.tar.gz.part0001/../../x'"),
        ("pieces.name", "install.sh", "'install.sh' is not a piece of 'installer.tar.gz'"),
        ("pieces.volume", 99, "piece 'installer.tar.gz' has no usable volume, offset and size"),
    ],
)
def test_hostile_split_json_names_refused(field, value, want, root, good, keys, tmp_path):
    """SPLIT.json is not signed: a hostile name in it is refused before it is used (install.sh, then the Python
    installer checks it again, tests/test_volumes.py)."""
    from installer.bundle import canonical_json

    vols = split_bundle(good, tmp_path / "usb", "6M")
    info_path = vols[0] / "SPLIT.json"
    info = json.loads(info_path.read_bytes())
    if field.startswith("pieces."):
        info["pieces"][0][field.split(".")[1]] = value
    else:
        info[field][-1] = value
    info_path.write_bytes(canonical_json(info))
    before = tree_snapshot(root)
    r = sh(vols[0] / "install.sh", "--root", root, "--pubkey", keys.pub, "--workdir", tmp_path / "w")
    assert r.returncode == 1 and f"SPLIT.json: {want}" in r.stderr, r.stderr
    assert tree_snapshot(root) == before
    assert not list((tmp_path / "w").iterdir())


def test_shellcheck_clean():
    """install.sh is what runs first, as root, on the server: shellcheck finds nothing in it (.ci installs it)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    from tests.installer_fixtures import INSTALLER_PKG

    r = run_command(["shellcheck", INSTALLER_PKG / "bootstrap" / "install.sh"], check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _other_layout(obj):
    """The same JSON written another way: no whitespace, keys in reverse order, non-ASCII escaped."""
    def rev(o):
        if isinstance(o, dict):
            return {k: rev(o[k]) for k in sorted(o, reverse=True)}
        return [rev(v) for v in o] if isinstance(o, list) else o

    return json.dumps(rev(obj), separators=(",", ":"), ensure_ascii=True).encode()


def test_a_manifest_and_split_json_in_another_layout_are_read_the_same(root, good, keys, tmp_path):
    """install.sh does not depend on canonical_json's layout: a MANIFEST.json re-serialised compact (keys
    reversed) and re-signed, split into volumes whose SPLIT.json is compact too, is verified and read as
    the canonical one (the runtime, installer and install.sh found by their entries, then the dry run)."""
    import hashlib

    b = copy_bundle(good, tmp_path)
    data = _other_layout(json.loads((b / "MANIFEST.json").read_bytes()))
    assert b"\n" not in data and not data.startswith(b'{"format_version"')
    (b / "MANIFEST.json").write_bytes(data)
    (b / SIGNATURE_NAME).write_bytes(keys.private.sign(data))
    vols = split_bundle(b, tmp_path / "usb", "6M")
    info = vols[0] / "SPLIT.json"
    compact = _other_layout(json.loads(info.read_bytes()))
    info.write_bytes(compact)
    index = vols[0] / "VOLUME.sha256"
    lines = [f"{hashlib.sha256(compact).hexdigest()}  SPLIT.json" if ln.endswith("  SPLIT.json") else ln
             for ln in index.read_text().splitlines()]
    index.write_text("\n".join(lines) + "\n")
    before = tree_snapshot(root)
    r = sh(vols[0] / "install.sh", "--dry-run", "--root", root, "--pubkey", keys.pub, "--workdir", tmp_path / "w",
           check=True)
    assert f"bundle demo 1.0.0: signature verified with key {keys.fingerprint}" in r.stderr, r.stderr
    assert "dry run: nothing was changed" in r.stdout
    assert tree_snapshot(root) == before


def test_a_signed_manifest_that_is_not_json_is_refused(root, keys, tmp_path, out):
    mo = copy_bundle(models_only_bundle(out, keys), tmp_path)
    data = (mo / "MANIFEST.json").read_bytes().rstrip().rstrip(b"}")  # cut short, then signed
    (mo / "MANIFEST.json").write_bytes(data)
    (mo / SIGNATURE_NAME).write_bytes(keys.private.sign(data))
    before = tree_snapshot(root)
    r = sh(mo / "install.sh", "--root", root, "--pubkey", keys.pub)
    assert r.returncode == 1 and "MANIFEST.json: not valid JSON (the document ends early)" in r.stderr
    assert "Traceback" not in r.stderr and tree_snapshot(root) == before
