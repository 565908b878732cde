"""packager.split: split into FAT32-sized volumes and join again; every volume checkable with sha256sum."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from installer.bundle import Bundle
from installer.errors import BundleError, IntegrityError, UsageError
from packager.bundle_writer import BundleWriter
from packager.split import (
    FAT32_MAX_FILE,
    _plan,
    check_volume,
    find_volumes,
    parse_size,
    read_split_info,
    split_bundle,
)


def _join(vols: list[Path], out: Path) -> Path:
    """Join volumes from SPLIT.json's piece list (the test's own reference join; install.sh does it for real)."""
    info = read_split_info(vols[0])
    for n, v in enumerate(vols, start=1):
        check_volume(v, n)
    for src in (vols[0] / "MANIFEST.json", vols[0] / "MANIFEST.json.sig", vols[0] / "install.sh"):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / src.name)
    for piece in info["pieces"]:
        dst = out / piece["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = vols[piece["volume"] - 1] / piece["name"]
        with open(src, "rb") as fi, open(dst, "r+b" if dst.exists() else "wb") as fo:
            fo.seek(piece["offset"])
            shutil.copyfileobj(fi, fo)
    return out


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(root).as_posix(): (p.lstat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest()
                                             if p.is_file() and not p.is_symlink() else "")
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    with BundleWriter(tmp_path / "out", "vt", "1.0") as w:
        w.add_bytes("install.sh", b"#!/bin/bash\necho hi\n", kind="bootstrap", mode=0o755)
        w.add_bytes("installer.tar.gz", os.urandom(3000), kind="installer")
        w.add_bytes("envs/e.tar.zst", os.urandom(5_000_000), kind="environment")
        for i in range(5):
            w.add_bytes(f"models/m/shard-{i}.safetensors", os.urandom(700_000 + i), kind="model")
        w.add_bytes("models/m/config.json", b"{}", kind="model")
        w.add_bytes("models/m/empty.txt", b"", kind="model")
        return w.commit({"bundle": {"name": "vt", "version": "1.0"}}, sign=lambda d: b"s" * 64).root


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("3.9G", int(3.9 * 2**30)),
        ("700M", 700 << 20),
        ("25G", 25 << 30),
        ("1024", 1024),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("4GB", 4 * 10**9),
        ("64k", 64 << 10),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "3.9Q", "-1G", "abc"])
def test_parse_size_refuses(bad):
    with pytest.raises(UsageError, match="not a size"):
        parse_size(bad)


@pytest.mark.parametrize("size", ["1200K", "2M", "3M", "20M"])
def test_split_then_join_gives_the_same_bundle(bundle, tmp_path, size):
    vols = split_bundle(bundle, tmp_path / "usb", size)
    limit = parse_size(size)
    for v in vols:
        total = sum(p.stat().st_size for p in v.rglob("*") if p.is_file())
        assert total <= limit, f"{v.name}: {total} > {limit}"
        # each volume checks with plain sha256sum on the media
        subprocess.run(["sha256sum", "--quiet", "-c", "VOLUME.sha256"], cwd=v, check=True)
    first = vols[0]
    assert {p.name for p in first.iterdir()} >= {
        "MANIFEST.json",
        "MANIFEST.json.sig",
        "install.sh",
        "SPLIT.json",
        "VOLUME.sha256",
    }
    info = read_split_info(first)
    assert info["volumes"] == len(vols) and [v.name for v in vols] == info["volume_names"]
    assert find_volumes(first) == vols
    joined = _join(vols, tmp_path / "joined")
    b = Bundle.load(joined)
    b.check_files()
    b0 = Bundle.load(bundle)
    assert b.manifest_bytes == b0.manifest_bytes
    assert (joined / "MANIFEST.json.sig").read_bytes() == (bundle / "MANIFEST.json.sig").read_bytes()
    if size != "20M":
        assert info["split_files"], "something had to be cut at this size"
    else:
        assert len(vols) == 1 and not info["split_files"]


def test_resplit_replaces_old_volumes(bundle, tmp_path):
    many = split_bundle(bundle, tmp_path / "usb", "1200K")
    few = split_bundle(bundle, tmp_path / "usb", "4M")
    assert len(few) < len(many)
    assert sorted(p.name for p in (tmp_path / "usb").iterdir()) == [v.name for v in few]


def test_corrupted_volume_is_named(bundle, tmp_path):
    vols = split_bundle(bundle, tmp_path / "usb", "2M")
    piece = next(p for p in sorted(vols[1].rglob("*")) if p.is_file() and p.name != "VOLUME.sha256")
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0xFF
    piece.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as ei:
        check_volume(vols[1], 2)
    assert f"volume 2 ({vols[1]}): {piece.relative_to(vols[1]).as_posix()}" in str(ei.value)
    with pytest.raises(IntegrityError):
        _join(vols, tmp_path / "joined")


HOSTILE_INDEX_LINES = [
    ("../outside.bin", "unsafe file name"),
    ("/etc/passwd", "unsafe file name"),
    ("a/../../outside.bin", "unsafe file name"),
    ("./x", "unsafe file name"),
    ("a//b", "unsafe file name"),
    ("a\\..\\b", "not a `sha256  name` line"),
    ("link/outside.bin", "is a symlink"),
    ("fifo", "not a regular file"),
    ("linkfile", "not a regular file"),
]


@pytest.mark.parametrize(("name", "error"), HOSTILE_INDEX_LINES)
def test_hostile_volume_index_is_refused_before_reading(bundle, tmp_path, name, error):
    vols = split_bundle(bundle, tmp_path / "usb", "2M")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    v = vols[1]
    (v / "link").symlink_to(tmp_path)
    (v / "linkfile").symlink_to(outside)
    os.mkfifo(v / "fifo")
    digest = hashlib.sha256(b"secret").hexdigest()
    with open(v / "VOLUME.sha256", "a", encoding="utf-8") as f:
        f.write(f"{digest}  {name}\n")
    before = _tree(tmp_path)
    with pytest.raises((BundleError, IntegrityError)) as ei:
        check_volume(v, 2)
    assert error in str(ei.value)
    assert _tree(tmp_path) == before
    print(f"hostile VOLUME.sha256 name {name!r}: refused ({error})")


@pytest.mark.parametrize("line", ["nothex  models/x", "0" * 63 + "  x", "0" * 64 + " x", "0" * 64 + "  "])
def test_malformed_volume_index_line_is_refused(bundle, tmp_path, line):
    vols = split_bundle(bundle, tmp_path / "usb", "2M")
    with open(vols[0] / "VOLUME.sha256", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(BundleError, match="not a `sha256  name` line"):
        check_volume(vols[0], 1)


def test_corrupt_bundle_is_not_split(bundle, tmp_path):
    p = bundle / "envs" / "e.tar.zst"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="envs/e.tar.zst"):
        split_bundle(bundle, tmp_path / "usb", "2M")
    assert not list((tmp_path / "usb").glob("vt-1.0.vol*"))


def test_plan_respects_fat32_piece_limit():
    big = 10 * (1 << 30)
    pieces = _plan([("envs/huge.tar.zst", big)], [("MANIFEST.json", 5000)], 64 << 30)
    assert all(p.size <= FAT32_MAX_FILE for p in pieces)
    assert sum(p.size for p in pieces) == big and len({p.volume for p in pieces}) == 1
    assert [p.name for p in pieces][:2] == ["envs/huge.tar.zst.part0001", "envs/huge.tar.zst.part0002"]
    offsets = [p.offset for p in pieces]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_plan_volumes_never_exceed_the_size():
    sizes = [("a", 3_000_000), ("b", 10), ("c", 2_500_000), ("d", 0), ("e", 7_777_777)]
    limit = 2 << 20
    pieces = _plan(sizes, [("MANIFEST.json", 100_000)], limit)
    per_vol: dict[int, int] = {}
    for p in pieces:
        per_vol[p.volume] = per_vol.get(p.volume, 0) + p.size + 64 + 3 + len(p.name)
    per_vol[1] = per_vol.get(1, 0) + 100_000 + 64 + 3 + len("MANIFEST.json")
    assert max(per_vol.values()) <= limit and min(per_vol.values()) > 0
    for name, size in sizes:
        assert sum(p.size for p in pieces if p.file == name) == size
    assert [p for p in pieces if p.file == "d"][0].size == 0


def test_split_onto_a_full_disk_is_a_clear_error_and_leaves_nothing(bundle, tmp_path):
    from click.testing import CliRunner

    from packager.cli import main as pack

    usb = tmp_path / "usb"
    usb.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(usb)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        res = CliRunner().invoke(pack, ["split", str(bundle), "--size", "2M", "--out", str(usb)])
        assert res.exit_code == 74, res.output
        assert "error: No space left on device" in res.output and "Traceback" not in res.output
        assert os.listdir(usb) == [], "no partial volume left on the disk"
    finally:
        subprocess.run(["umount", "-l", str(usb)], check=False)
