"""Content store and streaming hash helpers, on real files (and a second filesystem for the copy path)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from installer.errors import IntegrityError, UsageError
from packager.errors import NotFoundError
from packager.hashing import copy_and_hash, git_blob_sha1_and_sha256, hash_files, sha256_file
from packager.store import ContentStore, default_store_root, place_file


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


# -- hashing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
def test_sha256_and_copy_match_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = _write(tmp_path / "src.bin", data)
    assert sha256_file(src) == (_sha(data), size)
    dst = tmp_path / "out" / "dst.bin"
    dst.parent.mkdir()
    assert copy_and_hash(src, dst, bufsize=65536) == (_sha(data), size)
    assert dst.read_bytes() == data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]  # no .tmp left behind


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    data = os.urandom(5000) + b"\n"
    src = _write(tmp_path / "f", data)
    want = subprocess.run(["git", "hash-object", str(src)], capture_output=True, text=True, check=True).stdout
    oid, sha, size = git_blob_sha1_and_sha256(src)
    assert (oid, sha, size) == (want.strip(), _sha(data), len(data))


def test_hash_files_in_threads_agrees_and_reports_every_byte(tmp_path: Path) -> None:
    files = [_write(tmp_path / f"w{i}.bin", os.urandom((3 << 20) * (i + 1) + i)) for i in range(3)]
    expected = {os.fspath(p): sha256_file(p) for p in files}
    seen: list[int] = []
    ordered = list(hash_files(files, jobs=2, on_bytes=seen.append))
    assert [(p, (d, n)) for p, d, n in ordered] == [(os.fspath(p), expected[os.fspath(p)]) for p in files]
    assert sum(seen) == sum(p.stat().st_size for p in files)  # progress per chunk, from the worker threads
    unordered = list(hash_files(files, jobs=2, ordered=False))
    assert sorted(unordered) == sorted((p, *v) for p, v in expected.items())
    assert [p for p, _, _ in hash_files(files[::-1], jobs=1)] == [os.fspath(p) for p in files[::-1]]


def test_hash_files_raises_the_first_error_and_stops_the_others(tmp_path: Path) -> None:
    big = _write(tmp_path / "big.bin", os.urandom(1 << 20) * 64)  # 64 MiB, ~30 ms per thread
    with pytest.raises(FileNotFoundError):
        list(hash_files([big, tmp_path / "gone.bin", big], jobs=2, ordered=False))
    # closing the generator early cancels: the running hash stops at its next chunk
    chunks: list[int] = []
    gen = hash_files([big, big, big, big], jobs=2, on_bytes=chunks.append)
    next(gen)
    gen.close()
    assert sum(chunks) < 4 * big.stat().st_size


# -- store ---------------------------------------------------------------------------------------------------
def test_default_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM_PACK_STORE", str(tmp_path / "elsewhere"))
    assert default_store_root() == tmp_path / "elsewhere"
    assert ContentStore.default().root == tmp_path / "elsewhere"
    monkeypatch.delenv("LLM_PACK_STORE")
    assert default_store_root() == Path.home() / ".cache" / "llm-pack" / "store"


def test_add_file_copy(store: ContentStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = _write(tmp_path / "a.bin", data)
    blob = store.add_file(src, expected_sha256=_sha(data), expected_size=len(data), name="m/a.bin", move=False)
    assert blob == store.root / "sha256" / _sha(data)[:2] / _sha(data)
    assert blob.read_bytes() == data and src.exists()
    assert store.has(_sha(data)) and store.blob(_sha(data)) == blob
    assert blob.stat().st_mode & 0o222 == 0  # blobs are read-only
    assert list((store.root / "tmp").iterdir()) == []
    # adding the same content again is a no-op that returns the same blob
    assert store.add_file(src, expected_sha256=None, expected_size=None, name="m/a.bin", move=False) == blob
    assert store.verify(_sha(data))


def test_add_file_move(store: ContentStore) -> None:
    data = b"weights" * 1000
    src = _write(store.tmpdir() / "dl" / "w.bin", data)
    blob = store.add_file(src, expected_sha256=_sha(data), expected_size=len(data), name="m/w.bin", move=True)
    assert not src.exists() and blob.read_bytes() == data
    again = _write(store.tmpdir() / "dl" / "w2.bin", data)
    assert store.add_file(again, expected_sha256=_sha(data), expected_size=None, name="x", move=True) == blob
    assert not again.exists()


@pytest.mark.parametrize("move", [False, True])
def test_add_file_mismatch_names_file_and_stores_nothing(store: ContentStore, tmp_path: Path, move: bool) -> None:
    data = os.urandom(4096)
    src = _write(store.tmpdir() / "x.bin" if move else tmp_path / "x.bin", data)
    wrong = _sha(b"something else")
    with pytest.raises(IntegrityError) as ei:
        store.add_file(src, expected_sha256=wrong, expected_size=len(data), name="org/m/x.bin", move=move)
    assert ei.value.path == "org/m/x.bin" and ei.value.expected == wrong and ei.value.actual == _sha(data)
    assert "org/m/x.bin" in str(ei.value)
    with pytest.raises(IntegrityError) as ei:
        store.add_file(src, expected_sha256=_sha(data), expected_size=len(data) + 1, name="org/m/x.bin",
                       move=move)
    assert ei.value.what == "size"
    assert not store.has(_sha(data)) and not (store.root / "sha256").exists()
    assert src.exists()  # left for the caller
    assert [p.name for p in (store.root / "tmp").iterdir()] == (["x.bin"] if move else [])


def test_link_into_hardlink_is_a_real_file(store: ContentStore, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    blob = store.add_file(_write(tmp_path / "a", data), expected_sha256=None, expected_size=None, name="a",
                          move=False)
    dest = tmp_path / "bundle" / "models" / "m" / "model.safetensors"
    assert store.link_into(_sha(data), dest) == "hardlink"
    assert not dest.is_symlink() and dest.is_file()
    assert dest.stat().st_ino == blob.stat().st_ino and dest.read_bytes() == data
    # replacing an existing destination is atomic and leaves no temp files
    assert store.link_into(_sha(data), dest) == "hardlink"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors"]


def _other_filesystem(store: ContentStore) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != store.root.stat().st_dev:
        return shm
    return None


def test_link_into_other_filesystem_copies_and_verifies(store: ContentStore, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    blob = store.add_file(_write(tmp_path / "a", data), expected_sha256=None, expected_size=None, name="a",
                          move=False)
    other = _other_filesystem(store)
    if other is None:
        pytest.skip("no second writable filesystem (/dev/shm) here")
    out = Path(os.path.realpath(other)) / f"llm-pack-test-{os.getpid()}"
    try:
        dest = out / "model.bin"
        assert store.link_into(_sha(data), dest) in ("reflink", "copy")
        assert not dest.is_symlink() and dest.read_bytes() == data
        assert dest.stat().st_ino != blob.stat().st_ino
        # a blob whose bytes rotted in the store is caught on the copy path, naming the blob
        os.chmod(blob, 0o644)
        with open(blob, "r+b") as f:
            f.seek(100)
            f.write(bytes([data[100] ^ 0xFF]))
        assert not store.verify(_sha(data))
        with pytest.raises(IntegrityError) as ei:
            store.link_into(_sha(data), out / "again.bin")
        assert ei.value.path == str(blob)
        assert not (out / "again.bin").exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- place_file: any file (a store blob or the operator's own model file) into a bundle -----------------------
def test_place_file_hardlinks_on_the_same_filesystem(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    src = _write(tmp_path / "operator" / "model.safetensors", data)
    dest = tmp_path / "bundle" / "models" / "m" / "model.safetensors"
    assert place_file(src, dest, _sha(data)) == "hardlink"
    assert dest.stat().st_ino == src.stat().st_ino and not dest.is_symlink()
    _write(tmp_path / "bundle" / "models" / "m" / "other", b"x")
    assert place_file(src, dest, _sha(data)) == "hardlink"  # replaces atomically, no temp files left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors", "other"]
    with pytest.raises(NotFoundError, match="gone"):
        place_file(tmp_path / "nope", tmp_path / "bundle" / "x", _sha(data))


def test_place_file_across_filesystems_copies_and_verifies(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = _write(tmp_path / "operator" / "model.safetensors", data)
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev):
        pytest.skip("no second writable filesystem (/dev/shm) here")
    out = Path(os.path.realpath(shm)) / f"llm-pack-test-place-{os.getpid()}"
    try:
        dest = out / "models" / "m" / "model.safetensors"
        assert place_file(src, dest, _sha(data)) in ("reflink", "copy")
        assert dest.read_bytes() == data and dest.stat().st_ino != src.stat().st_ino
        # the bytes are not what the pin says (the operator's file changed): caught, naming the source
        wrong = _sha(b"what was pinned")
        with pytest.raises(IntegrityError) as ei:
            place_file(src, out / "again.safetensors", wrong)
        assert ei.value.path == str(src) and ei.value.expected == wrong and ei.value.actual == _sha(data)
        assert sorted(p.name for p in out.iterdir()) == ["models"]  # no partial file, no temp file
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_link_into_missing_blob(store: ContentStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        store.link_into("0" * 64, tmp_path / "x")
    with pytest.raises(UsageError):
        store.blob("not-a-sha")


def test_aliases(store: ContentStore, tmp_path: Path) -> None:
    data = b"tokenizer"
    store.add_file(_write(tmp_path / "t", data), expected_sha256=None, expected_size=None, name="t", move=False)
    assert store.lookup_alias("git-sha1", "ab" * 20) is None
    store.record_alias("git-sha1", "ab" * 20, _sha(data))
    assert store.lookup_alias("git-sha1", "ab" * 20) == _sha(data)
    store.record_alias("git-sha1", "cd" * 20, _sha(b"gone"))  # alias to a blob that is not there
    assert store.lookup_alias("git-sha1", "cd" * 20) is None
    assert store.lookup_alias("git-sha1", "cd" * 20, require_blob=False) == _sha(b"gone")  # content lives elsewhere
    with pytest.raises(UsageError):
        store.record_alias("git-sha1", "../escape", _sha(data))


@pytest.fixture
def xfs_mount(tmp_path: Path):
    """A loop-mounted XFS with reflink (needs root, mkfs.xfs and a loop device; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None or not Path("/dev/loop-control").exists():
        pytest.skip("needs root, xfsprogs and loop devices")
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(img, "wb") as f:
        f.truncate(400 << 20)
    mnt.mkdir()
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot loop-mount here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_add_file_on_reflink_filesystem_copies_no_bytes(xfs_mount: Path) -> None:
    store = ContentStore(xfs_mount / "store")
    data = os.urandom(100 << 20)
    src = _write(xfs_mount / "model" / "w.safetensors", data)
    os.sync()
    free_before = shutil.disk_usage(xfs_mount).free
    blob = store.add_file(src, expected_sha256=_sha(data), expected_size=len(data), name="w", move=False)
    os.sync()
    assert blob.read_bytes() == data and src.read_bytes() == data
    assert free_before - shutil.disk_usage(xfs_mount).free < 10 << 20  # a clone, not a 100 MiB copy
    with pytest.raises(IntegrityError):  # still hashed: a wrong expectation is caught
        store.add_file(src, expected_sha256=_sha(b"x"), expected_size=None, name="w", move=False)
