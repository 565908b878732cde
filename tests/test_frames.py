"""Framed environment archives: written by the real packer from a real conda env, decoded in parallel by the
installer, every frame verified; hostile framed archives refused with nothing left behind."""
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from installer.errors import BundleError, IntegrityError, UnsafeArchiveError
from installer.unpack import extract_archive
from installer.unpack.frames import Frame, extract_frames
from packager.env import pack as pack_mod
from packager.env.pack import pack_env
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401


def tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f" {p.stat().st_mode & 0o777:o}"
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def framed(built_env, tmp_path_factory):
    """The test env packed with small frames (64 KiB of tar each) so that it has many."""
    mp = pytest.MonkeyPatch()
    mp.setattr(pack_mod, "FRAME_BYTES", 64 << 10)
    try:
        return pack_env(built_env, tmp_path_factory.mktemp("framed") / "t1.tar.zst")
    finally:
        mp.undo()


def frames_of(res) -> list[Frame]:
    return [Frame(*f) for f in res.frames]


def test_frames_cover_the_archive_and_each_decodes_alone(framed):
    data = framed.path.read_bytes()
    fr = frames_of(framed)
    assert len(fr) > 10 and fr[0].offset == 0 and sum(f.size for f in fr) == len(data) == framed.size
    kinds = []
    for i, f in enumerate(fr):
        chunk = data[f.offset:f.offset + f.size]
        assert hashlib.sha256(chunk).hexdigest() == f.sha256
        tar_bytes = zstandard.ZstdDecompressor().decompressobj().decompress(chunk)  # one frame, alone
        members = list(tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r|"))
        assert members, f"frame {i} is empty"
        kinds.append({m.isreg() for m in members})
    assert False in kinds[0] and all(k == {True} for k in kinds[1:])  # links/dirs first, then files only


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_parallel_extraction_equals_the_sequential_one(framed, tmp_path, processes):
    seq, par = tmp_path / "seq", tmp_path / "par"
    extract_archive(framed.path, seq, expected_sha256=framed.sha256, expected_size=framed.size)
    res = extract_frames(framed.path, par, frames_of(framed), expected_size=framed.size, workers=4,
                         processes=processes)
    assert tree(par) == tree(seq)
    assert res.members == framed.files and res.bytes_out == framed.unpacked_size


def test_gnu_tar_reads_a_framed_archive_whole(framed, tmp_path):
    dest = tmp_path / "tar"
    dest.mkdir()
    subprocess.run(["tar", "-I", "zstd", "-xf", str(framed.path), "-C", str(dest)], check=True)
    ref = tmp_path / "ref"
    extract_archive(framed.path, ref, expected_sha256=framed.sha256, expected_size=framed.size)
    assert tree(dest).keys() == tree(ref).keys()


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_damaged_frame_is_named_and_nothing_is_left(framed, tmp_path, where, processes):
    bad = tmp_path / "bad.tar.zst"
    shutil.copyfile(framed.path, bad)
    fr = frames_of(framed)
    k = {"first": 0, "middle": len(fr) // 2, "last": len(fr) - 1}[where]
    with open(bad, "r+b") as f:
        pos = fr[k].offset + fr[k].size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=f"part {k}, bytes {fr[k].offset}-"):
        extract_frames(bad, dest, fr, expected_size=framed.size, workers=3, processes=processes)
    assert not dest.exists()


def test_frames_must_cover_the_file(framed, tmp_path):
    fr = frames_of(framed)
    gap = [fr[0], Frame(fr[1].offset + 1, fr[1].size - 1, fr[1].sha256), *fr[2:]]
    with pytest.raises(BundleError, match="frame 1 starts at byte"):
        extract_frames(framed.path, tmp_path / "d1", gap, expected_size=framed.size)
    with pytest.raises(IntegrityError):
        extract_frames(framed.path, tmp_path / "d2", fr[:-1], expected_size=framed.size)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


# --------------------------------------------------------------------------- hostile framed archives


def _member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.linkname = kind, len(data), 0o644, link
    if kind != tarfile.REGTYPE:
        ti.size = 0
    pad = b"\0" * (-len(data) % 512) if kind == tarfile.REGTYPE else b""
    return ti.tobuf(tarfile.PAX_FORMAT) + (data + pad if kind == tarfile.REGTYPE else b"")


def _framed(path: Path, parts: list[list[bytes]]) -> list[Frame]:
    """Write ``parts`` (each a list of tar members) as one archive of independent zstd frames."""
    out, frames = b"", []
    for i, members in enumerate(parts):
        tar = b"".join(members) + (b"\0" * 1024 if i == len(parts) - 1 else b"")
        comp = zstandard.ZstdCompressor().compress(tar)
        frames.append(Frame(len(out), len(comp), hashlib.sha256(comp).hexdigest()))
        out += comp
    path.write_bytes(out)
    return frames


@pytest.mark.parametrize("parts,says", [
    ([[_member("d", kind=tarfile.DIRTYPE)], [_member("d/link", kind=tarfile.SYMTYPE, link="x")]],
     "a link or directory after the first part"),
    ([[_member("a", b"1")], [_member("b", b"2")], [_member("a", b"3")]], "named twice"),
    ([[_member("lib", kind=tarfile.SYMTYPE, link="real")], [_member("lib/evil.so", b"x")]], "symlink"),
    ([[_member("x", b"1")], [_member("../escape", b"2")]], ".."),
])
@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_hostile_framed_archives_are_refused(tmp_path, parts, says, processes):
    arch = tmp_path / "h.tar.zst"
    frames = _framed(arch, parts)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=says):
        extract_frames(arch, dest, frames, expected_size=arch.stat().st_size, workers=2, processes=processes)
    assert not dest.exists()
    assert not (tmp_path / "escape").exists()
