"""installer.volumes: split into FAT32-sized volumes and join again; every volume checkable with sha256sum."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from installer.bundle import Bundle, BundleWriter
from installer.errors import IntegrityError, UsageError
from installer.volumes import (
    FAT32_MAX_FILE,
    _plan,
    check_volume,
    find_volumes,
    parse_size,
    read_split_info,
    reassemble,
    split_bundle,
)


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
    joined = reassemble(vols, tmp_path / "joined")
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
        reassemble(vols, tmp_path / "joined")


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
