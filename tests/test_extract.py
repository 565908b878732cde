"""installer.unpack: hostile archives refused, nothing written outside, hashes checked in one pass."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from installer.errors import BundleError, IntegrityError, UnsafeArchiveError
from installer.unpack import copy_verified, extract_archive


def _ti(
    name: str, *, type_: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.mtime = 1_700_000_000
    ti.linkname = linkname
    if type_ == tarfile.REGTYPE:
        ti.size = len(data)
        return ti, data
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, None


def write_archive(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], *, compression: str = "zstd"
) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    body = raw.getvalue()
    if compression == "zstd":
        body = zstandard.ZstdCompressor(level=3).compress(body)
    elif compression == "gzip":
        import gzip

        body = gzip.compress(body, mtime=0)
    path.write_bytes(body)
    return hashlib.sha256(body).hexdigest()


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} | set()


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(outside dir, destination, archive path): ``dest`` sits inside ``outside`` so escapes land there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep")
    (outside / "box").mkdir()
    return outside, outside / "box" / "dest", tmp_path / "a.tar.zst"


HOSTILE = {
    "dotdot": ([_ti("../x", data=b"pwn")], "'..'"),
    "dotdot-inner": ([_ti("ok/../../x", data=b"pwn")], "'..'"),
    "absolute": ([_ti("/tmp/llm-pwn-abs", data=b"pwn")], "absolute"),
    "symlink-out": ([_ti("evil", type_=tarfile.SYMTYPE, linkname="../../x")], "leaves the destination"),
    "symlink-abs": ([_ti("evil", type_=tarfile.SYMTYPE, linkname="/etc/passwd")], "absolute"),
    "symlink-dotdot-then-write": (
        [_ti("evil", type_=tarfile.SYMTYPE, linkname=".."), _ti("evil/x", data=b"pwn")],
        "leaves the destination",
    ),
    "symlink-in-then-through": (
        [
            _ti("sub", type_=tarfile.DIRTYPE, mode=0o755),
            _ti("evil", type_=tarfile.SYMTYPE, linkname="sub"),
            _ti("evil/x", data=b"pwn"),
        ],
        "through the symlink",
    ),
    "symlink-order-trick": (
        [
            _ti("d", type_=tarfile.DIRTYPE, mode=0o755),
            _ti("d/l2", type_=tarfile.SYMTYPE, linkname="l1/.."),
            _ti("d/l1", type_=tarfile.SYMTYPE, linkname="."),
        ],
        "'..' inside",
    ),
    "hardlink-out": ([_ti("evil", type_=tarfile.LNKTYPE, linkname="../../sentinel")], "hard link"),
    "hardlink-abs": ([_ti("evil", type_=tarfile.LNKTYPE, linkname="/etc/passwd")], "hard link"),
    "chardev": ([_ti("null", type_=tarfile.CHRTYPE)], "device node"),
    "blockdev": ([_ti("disk", type_=tarfile.BLKTYPE)], "device node"),
    "fifo": ([_ti("pipe", type_=tarfile.FIFOTYPE)], "fifo"),
    "setuid": ([_ti("su", data=b"#!/bin/sh\n", mode=0o4755)], "setuid"),
    "setgid": ([_ti("sg", data=b"#!/bin/sh\n", mode=0o2755)], "setuid/setgid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_refused_and_nothing_written_outside(case: str, sandbox) -> None:
    outside, dest, archive = sandbox
    members, reason = HOSTILE[case]
    # a good file first: it is extracted, then removed with the rest when the bad member comes
    sha = write_archive(archive, [_ti("good.txt", data=b"fine"), *members])
    before = _tree(outside)
    with pytest.raises(UnsafeArchiveError) as ei:
        extract_archive(archive, dest, expected_sha256=sha)
    assert reason in str(ei.value)
    assert ei.value.member  # names the member
    assert not dest.exists(), "the partial destination is removed"
    assert _tree(outside) == before, "nothing written outside the destination"
    assert (outside / "sentinel").read_text() == "keep"
    assert not Path("/tmp/llm-pwn-abs").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_legitimate_links_and_modes_extract(tmp_path: Path, workers: int) -> None:
    archive = tmp_path / "env.tar.zst"
    members = [
        _ti("env", type_=tarfile.DIRTYPE, mode=0o755),
        _ti("env/bin", type_=tarfile.DIRTYPE, mode=0o755),
        _ti("env/bin/python3.11", data=b"#!/bin/sh\necho hi\n", mode=0o775),
        _ti("env/bin/python", type_=tarfile.SYMTYPE, linkname="python3.11"),
        _ti("env/lib/libz.so.1.3", data=b"\x7fELF" + bytes(5000), mode=0o755),
        _ti("env/lib/libz.so", type_=tarfile.SYMTYPE, linkname="libz.so.1.3"),
        _ti("env/share/tool", type_=tarfile.SYMTYPE, linkname="../bin/python"),
        _ti("env/lib/hard", type_=tarfile.LNKTYPE, linkname="env/lib/libz.so.1.3"),
        _ti("env/data.txt", data=b"v1", mode=0o600),
        _ti("env/data.txt", data=b"v2 wins", mode=0o644),  # a name seen twice: the later one wins
        _ti("env/big.bin", data=os.urandom(3 << 20)),  # above the worker threshold
    ]
    sha = write_archive(archive, members)
    res = extract_archive(
        archive, tmp_path / "out", expected_sha256=sha, expected_size=archive.stat().st_size, workers=workers
    )
    out = tmp_path / "out" / "env"
    assert os.readlink(out / "bin" / "python") == "python3.11"
    assert (out / "share" / "tool").resolve() == (out / "bin" / "python3.11").resolve()
    assert (out / "lib" / "hard").stat().st_ino == (out / "lib" / "libz.so.1.3").stat().st_ino
    assert (out / "data.txt").read_bytes() == b"v2 wins"
    assert stat.S_IMODE((out / "bin" / "python3.11").stat().st_mode) == 0o755  # g+w dropped
    assert (out / "bin" / "python3.11").stat().st_mtime == 1_700_000_000
    assert (out / "big.bin").stat().st_size == 3 << 20
    assert res.sha256 == sha and res.members == len(members)


def test_hash_mismatch_removes_everything(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    write_archive(archive, [_ti("f", data=b"x" * 1000)])
    with pytest.raises(IntegrityError) as ei:
        extract_archive(archive, tmp_path / "out", expected_sha256="0" * 64, display_name="envs/a.tar.zst")
    assert "envs/a.tar.zst" in str(ei.value) and "sha256 mismatch" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_stream_is_an_integrity_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    sha = write_archive(archive, [_ti(f"f{i}", data=os.urandom(20_000)) for i in range(20)])
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        extract_archive(archive, tmp_path / "out", expected_sha256=sha)
    assert not (tmp_path / "out").exists()


def test_trailing_garbage_detected(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    sha = write_archive(archive, [_ti("f", data=b"hello")])
    with open(archive, "ab") as f:
        f.write(b"appended")
    with pytest.raises(IntegrityError):
        extract_archive(archive, tmp_path / "out", expected_sha256=sha)


def test_size_checked_before_reading(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    sha = write_archive(archive, [_ti("f", data=b"hello")], compression="gzip")
    with pytest.raises(IntegrityError, match="size mismatch"):
        extract_archive(archive, tmp_path / "out", expected_sha256=sha, expected_size=1)
    res = extract_archive(archive, tmp_path / "out", expected_sha256=sha)
    assert (tmp_path / "out" / "f").read_bytes() == b"hello" and res.members == 1


def test_destination_must_be_empty(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    sha = write_archive(archive, [_ti("f", data=b"hello")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        extract_archive(archive, tmp_path / "out", expected_sha256=sha)


def test_copy_verified(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    src.write_bytes(os.urandom(5 << 20))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "d" / "w.safetensors"
    dst.parent.mkdir()
    assert copy_verified(src, dst, expected_sha256=sha, expected_size=5 << 20) == 5 << 20
    assert dst.read_bytes() == src.read_bytes()
    dst.unlink()
    with pytest.raises(IntegrityError):
        copy_verified(src, dst, expected_sha256="1" * 64)
    assert list(dst.parent.iterdir()) == [], "no file, no temp file left on a mismatch"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_copy_verified_refuses_a_link_or_fifo_swapped_in(tmp_path, kind):
    # a file on the medium replaced after the artifact check: never followed, never waited on
    real = tmp_path / "real.bin"
    real.write_bytes(b"x" * 10)
    src = tmp_path / "model.safetensors"
    if kind == "symlink":
        src.symlink_to(real)
    else:
        os.mkfifo(src)
    dst = tmp_path / "out" / "model.safetensors"
    dst.parent.mkdir()
    want = hashlib.sha256(b"x" * 10).hexdigest()
    with pytest.raises(BundleError, match="is a symlink" if kind == "symlink" else "is not a regular file"):
        copy_verified(src, dst, expected_sha256=want, expected_size=10)
    assert list(dst.parent.iterdir()) == []


def test_copy_verified_stops_when_another_copy_failed(tmp_path):
    import threading

    from installer.unpack import CopyCancelled

    src = tmp_path / "shard.bin"
    with open(src, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    stop = threading.Event()
    stop.set()
    dst = tmp_path / "out.bin"
    with pytest.raises(CopyCancelled):
        copy_verified(src, dst, expected_sha256="0" * 64, expected_size=64 << 20, stop=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]  # no partial file left
