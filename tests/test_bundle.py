"""Bundle format: writer → reader round trip, verify catches a flipped byte in every kind of artifact,
unlisted files, and the signature checks with both cryptography and the bare `openssl` command."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from installer import bundle as fmt
from installer.bundle.signature import _verify_with_openssl
from installer.errors import BundleError, IntegrityError, SignatureError
from packager.bundle_writer import BundleWriter, _exchange
from packager.cli import main
from packager.signing import keygen, load_private_key

KINDS = {
    "install.sh": "bootstrap",
    "installer.tar.gz": "installer",
    "runtime/env.tar.gz": "runtime",
    "envs/env.tar.zst": "environment",
    "models/tiny/model.safetensors": "model",
    "models/tiny/config.json": "model",
}


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "keys").mkdir()
    key, pub, fp = keygen(tmp_path / "keys" / "build")
    assert fp.startswith("sha256:") and oct(key.stat().st_mode & 0o777) == "0o600"
    return key, pub


def make_bundle(out: Path, key_path: Path | None, *, name: str = "b", version: str = "1") -> Path:
    key = load_private_key(key_path) if key_path else None
    with BundleWriter(out, name, version) as w:
        for i, (rel, kind) in enumerate(sorted(KINDS.items())):
            data = os.urandom(4096 + i) if kind != "bootstrap" else b"#!/bin/bash\necho hi\n"
            w.add_bytes(rel, data, kind=kind)
        b = w.commit({"bundle": {"name": name, "version": version}, "models": [], "environments": [],
                      "services": []}, sign=(key.sign if key else None))
    return b.root


def test_round_trip_and_layout(tmp_path: Path, keys) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    assert root == tmp_path / "out" / "b-1"
    assert sorted(os.listdir(tmp_path / "out")) == ["b-1"], "no staging leftovers"
    b = fmt.Bundle.load(root)
    assert b.manifest["format_version"] == fmt.FORMAT_VERSION
    assert {a.path: a.kind for a in b.artifacts} == KINDS
    assert b.check_signature([pub.read_bytes()]).startswith("sha256:")
    b.check_files()
    # canonical bytes: re-serialising gives the same bytes (what was signed is what is parsed)
    assert fmt.canonical_json(json.loads(b.manifest_bytes)) == b.manifest_bytes


@pytest.mark.parametrize("rel", sorted(KINDS))
def test_one_flipped_byte_in_any_artifact_fails_naming_it(tmp_path: Path, keys, rel: str) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    p = root / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as ei:
        fmt.Bundle.load(root).check_files()
    assert ei.value.path == rel
    r = CliRunner().invoke(main, ["verify", str(root), "--pubkey", str(pub)])
    assert r.exit_code != 0 and rel in r.output and "sha256 mismatch" in r.output
    assert "Traceback" not in r.output


def test_verify_cli_ok_and_json(tmp_path: Path, keys) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    r = CliRunner().invoke(main, ["verify", str(root), "--pubkey", str(pub), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] is True and out["artifacts"] == len(KINDS) and out["signed_by"].startswith("sha256:")


def test_missing_truncated_and_unlisted_files(tmp_path: Path, keys) -> None:
    key, _ = keys
    root = make_bundle(tmp_path / "out", key)
    (root / "models" / "tiny" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="not listed in MANIFEST.json: models/tiny/extra.bin"):
        fmt.Bundle.load(root).check_files()
    (root / "models" / "tiny" / "extra.bin").unlink()
    (root / "installer.tar.gz").unlink()
    with pytest.raises(IntegrityError, match="installer.tar.gz: file mismatch"):
        fmt.Bundle.load(root).check_files()
    root2 = make_bundle(tmp_path / "out2", key)
    with open(root2 / "envs" / "env.tar.zst", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="envs/env.tar.zst: size mismatch"):
        fmt.Bundle.load(root2).check_files()


def test_tampered_manifest_and_wrong_key_refused(tmp_path: Path, keys) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other_pub, _ = keygen(other_dir / "o")
    with pytest.raises(SignatureError, match="does not match"):
        fmt.Bundle.load(root).check_signature([other_pub.read_bytes()])
    m = (root / fmt.MANIFEST_NAME).read_bytes().replace(b'"version": "1"', b'"version": "2"')
    (root / fmt.MANIFEST_NAME).write_bytes(m)
    with pytest.raises(SignatureError):
        fmt.Bundle.load(root).check_signature([pub.read_bytes()])
    r = CliRunner().invoke(main, ["verify", str(root), "--pubkey", str(pub)])
    assert r.exit_code == 1 and "does not match" in r.output


def test_unsigned_bundle(tmp_path: Path, keys) -> None:
    _, pub = keys
    root = make_bundle(tmp_path / "out", None)
    with pytest.raises(SignatureError, match="not signed"):
        fmt.Bundle.load(root).check_signature([pub.read_bytes()])
    r = CliRunner().invoke(main, ["verify", str(root), "--insecure"])
    assert r.exit_code == 0 and "NOT CHECKED" in r.output


def _openssl_verify(pub: Path, root: Path) -> subprocess.CompletedProcess:
    # exactly the command documented in docs/bundle-format.md and `pack keygen --help`
    return subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
                           "-in", str(root / "MANIFEST.json"), "-sigfile", str(root / "MANIFEST.json.sig")],
                          capture_output=True, text=True)


def test_openssl_alone_accepts_good_and_refuses_tampered(tmp_path: Path, keys) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    good = _openssl_verify(pub, root)
    assert good.returncode == 0 and "Signature Verified Successfully" in good.stdout
    m = bytearray((root / "MANIFEST.json").read_bytes())
    m[10] ^= 0x20
    (root / "MANIFEST.json").write_bytes(bytes(m))
    bad = _openssl_verify(pub, root)
    assert bad.returncode != 0


def test_openssl_fallback_used_without_cryptography(tmp_path: Path, keys, monkeypatch) -> None:
    key, pub = keys
    root = make_bundle(tmp_path / "out", key)
    data = (root / "MANIFEST.json").read_bytes()
    sig = (root / "MANIFEST.json.sig").read_bytes()
    assert _verify_with_openssl(data, sig, pub.read_bytes()) is True
    assert _verify_with_openssl(data + b" ", sig, pub.read_bytes()) is False


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../b", "a//b", "a\\b", ""])
def test_unsafe_artifact_paths_rejected(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "b"
    root.mkdir()
    doc = {"format_version": 1, "bundle": {"name": "b", "version": "1"},
           "artifacts": [{"path": bad, "size": 1, "sha256": "0" * 64, "kind": "model"}]}
    (root / "MANIFEST.json").write_bytes(fmt.canonical_json(doc))
    with pytest.raises(BundleError, match="unsafe artifact path"):
        fmt.Bundle.load(root)


def test_unknown_format_version_and_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle directory"):
        fmt.Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="no MANIFEST.json"):
        fmt.Bundle.load(tmp_path)
    (tmp_path / "MANIFEST.json").write_text('{"format_version": 99}')
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        fmt.Bundle.load(tmp_path)


def test_failed_commit_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with BundleWriter(out, "b", "1") as w:
            w.add_bytes("install.sh", b"x", kind="bootstrap")
            raise RuntimeError("boom")
    assert os.listdir(out) == []


def test_rebuild_replaces_previous_bundle_atomically(tmp_path: Path, keys) -> None:
    key, pub = keys
    make_bundle(tmp_path / "out", key)
    root = make_bundle(tmp_path / "out", key)
    assert sorted(os.listdir(tmp_path / "out")) == ["b-1"]
    fmt.Bundle.load(root).check_files()


def test_keygen_refuses_to_overwrite_and_cli(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0 and "fingerprint sha256:" in r.output
    r = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    os.chmod(tmp_path / "k.key", 0o644)
    from installer.errors import UsageError
    with pytest.raises(UsageError, match="chmod 600"):
        load_private_key(tmp_path / "k.key")


def test_keygen_creates_a_missing_parent_0700_as_in_a_fresh_checkout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the README's first command, run where there is no keys/ yet
    r = CliRunner().invoke(main, ["keygen", "--out", "keys/build"])
    assert r.exit_code == 0, r.output
    assert oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "keys" / "build.key").stat().st_mode & 0o777) == "0o600"
    load_private_key(tmp_path / "keys" / "build.key")
    (tmp_path / "nested").write_text("a file where a directory should be")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["keygen", "--out", "nested/build"])
    assert r.exit_code == 2 and "nested exists and is not a directory" in r.output
    assert "Traceback" not in r.output and sorted(p.name for p in tmp_path.iterdir()) == before


# -- what is signed is what was read (hash_pending) -------------------------------------------------------
def _tree(root: Path) -> dict[str, tuple[int, str]]:
    import hashlib
    return {p.relative_to(root).as_posix(): (p.lstat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest()
                                             if p.is_file() and not p.is_symlink() else "")
            for p in sorted(root.rglob("*"))}


def _linked_writer(tmp_path: Path, data: bytes, recorded_sha: str | None):
    src = tmp_path / "cache" / "blob.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    w = BundleWriter(tmp_path / "out", "b", "1")
    w.add_bytes("install.sh", b"#!/bin/bash\n", kind="bootstrap", mode=0o755)
    os.link(src, w.path("models/m/w.safetensors"))
    w.record("models/m/w.safetensors", kind="model", sha256=recorded_sha, size=len(data), source=src,
             hint="the cache is damaged")
    return w, src


def test_hardlinked_artifact_is_read_before_signing_and_a_rotted_one_is_refused(tmp_path: Path, keys) -> None:
    import hashlib
    key, pub = keys
    good = os.urandom(3 << 20)
    w, src = _linked_writer(tmp_path, good, hashlib.sha256(good).hexdigest())
    rotted = bytearray(good)
    rotted[12345] ^= 0x40  # the cached blob rots after it was recorded (same size, same name)
    with open(src, "r+b") as f:
        f.write(rotted)
    out_before = sorted(os.listdir(tmp_path / "out"))
    signed: list[bytes] = []
    with pytest.raises(IntegrityError) as ei:
        with w:
            w.commit({"bundle": {"name": "b", "version": "1"}}, sign=lambda d: signed.append(d) or b"s" * 64)
    assert str(ei.value).startswith(f"models/m/w.safetensors (from {src}): sha256 mismatch")
    assert "the cache is damaged" in str(ei.value) and ei.value.artifact == "models/m/w.safetensors"
    assert signed == [], "nothing was signed"
    assert [n for n in os.listdir(tmp_path / "out") if n not in out_before] == []
    assert not (tmp_path / "out" / "b-1").exists() and os.listdir(tmp_path / "out") == []


def test_unknown_sha_is_taken_from_the_one_read_and_signed(tmp_path: Path, keys) -> None:
    import hashlib
    key, pub = keys
    data = os.urandom(1 << 20)
    w, _ = _linked_writer(tmp_path, data, None)
    with w:
        done = w.hash_pending(jobs=2)
        assert done["models/m/w.safetensors"].sha256 == hashlib.sha256(data).hexdigest()
        b = w.commit({"bundle": {"name": "b", "version": "1"}}, sign=load_private_key(key).sign)
    assert b.artifact("models/m/w.safetensors").sha256 == hashlib.sha256(data).hexdigest()
    b.check_signature([pub.read_bytes()])
    b.check_files()


def test_a_source_edited_in_place_after_hashing_is_refused_before_the_switch(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    w, src = _linked_writer(tmp_path, data, None)

    def sign_while_someone_edits(d: bytes) -> bytes:  # the operator rewrites the file meanwhile
        with open(src, "r+b") as f:
            f.seek(100)
            f.write(b"edited")
        os.utime(src, ns=(1, 1))
        return b"s" * 64

    with pytest.raises(IntegrityError, match="models/m/w.safetensors: content mismatch"):
        with w:
            w.commit({"bundle": {"name": "b", "version": "1"}}, sign=sign_while_someone_edits)
    assert os.listdir(tmp_path / "out") == []


# -- the switch: one atomic step, leftovers of a crashed writer cleaned ------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


_WATCHER = """
import os, sys
final, stop = sys.argv[1], sys.argv[2]
looks = missing = 0
while not os.path.exists(stop):
    looks += 1
    if not os.path.isfile(os.path.join(final, "MANIFEST.json")):
        missing += 1
print(looks, missing)
"""


def test_switch_never_leaves_the_final_path_without_a_bundle(tmp_path: Path) -> None:
    import sys
    make_bundle(tmp_path / "out", None)
    final = tmp_path / "out" / "b-1"
    stop = tmp_path / "stop"
    # another process (another core) looks at the final path all the time while the bundle is rebuilt
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(final), str(stop)], stdout=subprocess.PIPE,
                               text=True)
    inodes = set()
    try:
        for _ in range(60):
            inodes.add(make_bundle(tmp_path / "out", None).stat().st_ino)
    finally:
        stop.touch()
        looks, missing = map(int, watcher.communicate(timeout=30)[0].split())
    print(f"switch: 60 rebuilds, {looks} looks at the final path from another process, {missing} without a bundle")
    assert missing == 0 and looks > 60 and len(inodes) > 1
    assert os.listdir(tmp_path / "out") == ["b-1"], "no .partial or .old-PID left"


def test_leftovers_of_a_crashed_writer_are_cleaned_and_a_stranded_old_bundle_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = make_bundle(out, None)
    manifest = (root / fmt.MANIFEST_NAME).read_bytes()
    dead = _dead_pid()
    # crash between the fallback's two renames: the previous bundle is only at .old-PID, nothing at b-1
    os.replace(root, out / f".b-1.old-{dead}")
    (out / f".b-1.{dead}-abc123.partial" / "models").mkdir(parents=True)  # a crashed staging directory
    live = out / f".b-1.{os.getppid()}-live01.partial"  # a writer that is still running: left alone
    live.mkdir()
    other = out / f".b-10.{dead}-abc123.partial"  # another bundle's leftovers: not ours to judge
    other.mkdir()
    w = BundleWriter(out, "b", "1")
    try:
        assert w.recovered == out / "b-1" and (out / "b-1" / fmt.MANIFEST_NAME).read_bytes() == manifest
        assert sorted(os.listdir(out)) == sorted(["b-1", live.name, other.name, w.staging.name])
    finally:
        w.abort()
    assert sorted(os.listdir(out)) == sorted(["b-1", live.name, other.name])


def test_exchange_swaps_two_directories_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    assert _exchange(a, b) is True
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"
    assert _exchange(a, tmp_path / "missing") is False and (a / "x").exists()
