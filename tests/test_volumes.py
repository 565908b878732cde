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


# --------------------------------------------------------------------------- reading in place (the installer's side)


def _volumes(vols: list[Path], search=()):
    from installer.bundle.volumes import Volumes

    b = Bundle.load(vols[0])
    return b, Volumes.load(vols[0], vols[0] / "SPLIT.json", {a.path: a.size for a in b.artifacts},
                           b.manifest_sha256, search=search)


def _pieces(v, b: Bundle, path: str):
    from installer.unpack.pieces import Pieces

    a = b.artifact(path)
    return Pieces(a.path, a.size, v.spans_of(a.path), v)


def test_every_artifact_reads_in_place_from_its_pieces(bundle, tmp_path):
    """Sequential reads and reads at any offset (what the frame readers do) give the bundle's bytes, across
    piece boundaries, with at most one piece open at a time."""
    import random

    vols = split_bundle(bundle, tmp_path / "usb", "1200K")
    b, v = _volumes(vols)
    assert any(len(s) > 1 for s in v.pieces.values()), "something spans volumes"
    rnd = random.Random(3)
    for a in b.artifacts:
        want = (bundle / a.path).read_bytes()
        with _pieces(v, b, a.path).open() as f:
            got = bytearray()
            while n := f.readinto(buf := bytearray(rnd.choice([1, 4096, 1 << 20]))):
                got += buf[:n]
            assert bytes(got) == want, a.path
            for _ in range(20):
                pos = rnd.randrange(len(want) + 1)
                data = f.pread(rnd.randrange(1, 3 << 20), pos)
                assert data == want[pos:pos + len(data)] and (data or pos == len(want))
            assert len([fd for fd in os.listdir("/proc/self/fd")]) < 64


def test_a_piece_is_never_read_through_a_link_or_from_a_fifo(bundle, tmp_path):
    from installer.unpack.pieces import PieceFile

    vols = split_bundle(bundle, tmp_path / "usb", "1200K")
    b, v = _volumes(vols)
    path, spans = next((p, s) for p, s in v.pieces.items() if len(s) > 1 and "/" in s[1].name)
    second = spans[1]
    vol = v.locate(second.volume)
    piece = vol / second.name
    real = tmp_path / "elsewhere"
    real.mkdir()
    shutil.move(piece, real / piece.name)

    def read_all() -> bytes:
        with PieceFile(_pieces(v, b, path)) as f:
            out = b""
            while chunk := f.read(1 << 20):
                out += chunk
            return out

    piece.symlink_to(real / piece.name)  # the same bytes, behind a link
    with pytest.raises(BundleError, match="is a symlink"):
        read_all()
    piece.unlink()
    top = second.name.split("/")[0]
    shutil.move(vol / top, real / "dir")
    (vol / top).symlink_to(real / "dir")  # a linked directory on the way
    (real / "dir").joinpath(*second.name.split("/")[1:]).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(real / piece.name, (real / "dir").joinpath(*second.name.split("/")[1:]))
    with pytest.raises(BundleError, match=f"{top} is a symlink"):
        read_all()
    (vol / top).unlink()
    shutil.move(real / "dir", vol / top)
    fifo_at = vol / second.name
    data = fifo_at.read_bytes()
    fifo_at.unlink()
    os.mkfifo(fifo_at)  # nobody writes it: opening must not wait
    with pytest.raises(BundleError, match="not a regular file"):
        read_all()
    fifo_at.unlink()
    fifo_at.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match=f"volume {second.volume} of {v.count} .*: size mismatch"):
        read_all()
    fifo_at.write_bytes(data)
    assert read_all() == (bundle / path).read_bytes()


def test_a_damaged_piece_is_named_by_its_volume_index(bundle, tmp_path):
    vols = split_bundle(bundle, tmp_path / "usb", "1200K")
    b, v = _volumes(vols)
    path, spans = next((p, s) for p, s in v.pieces.items() if len(s) > 2)
    s = spans[1]
    p = v.locate(s.volume) / s.name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 4
    p.write_bytes(bytes(data))
    pieces = _pieces(v, b, path)
    want = f"volume {s.volume} ({v.locate(s.volume)}): {s.name} is corrupted (sha256 mismatch)"
    assert pieces.damaged(v.index) == want
    assert pieces.damaged(v.index, 0, spans[0].size) is None  # only the pieces of the range that failed


def test_volumes_are_found_beside_the_first_or_under_volumes_dirs(bundle, tmp_path):
    from installer.bundle.volumes import VolumeMissingError

    vols = split_bundle(bundle, tmp_path / "usb", "2M")
    media = tmp_path / "media"
    moved = media / "disk3" / vols[2].name
    shutil.move(vols[2], moved)
    b, v = _volumes(vols)
    with pytest.raises(VolumeMissingError) as ei:
        v.where(3)
    assert f"volume 3 of {len(vols)} ({vols[2].name}) not found" in str(ei.value)
    assert "--volumes DIR" in str(ei.value) and "run the same command again" in str(ei.value)
    asked = []
    v.ask = lambda wanted: asked.append(wanted) or False  # the operator types q
    with pytest.raises(VolumeMissingError):
        v.where(3)
    assert asked and f"volume 3 of {len(vols)} ({vols[2].name}) is needed now" in asked[0]
    for search in ([media / "disk3"], [moved]):  # the directory holding the volume, or the volume itself
        assert _volumes(vols, search)[1].where(3) == moved
    v.ask = lambda wanted: bool(shutil.move(moved, vols[2]))  # mounted while asked
    assert v.where(3) == vols[2]


@pytest.mark.parametrize("case", ["gap", "overlap", "unknown-file", "bad-volume", "other-manifest", "bad-name",
                                  "missing-artifact"])
def test_a_split_json_that_pack_split_did_not_write_is_refused(bundle, tmp_path, case):
    import json

    from installer.bundle import canonical_json
    from installer.bundle.volumes import Volumes

    vols = split_bundle(bundle, tmp_path / "usb", "1200K")
    info = json.loads((vols[0] / "SPLIT.json").read_bytes())
    cut = next(p for p in info["pieces"] if p["name"] != p["file"] and p["offset"] > 0)
    if case == "gap":
        cut["offset"] += 1
    elif case == "overlap":
        cut["offset"] -= 1
    elif case == "unknown-file":
        info["pieces"].append({"file": "models/m/x", "name": "models/m/x", "volume": 1, "offset": 0, "size": 1})
    elif case == "bad-volume":
        cut["volume"] = len(vols) + 1
    elif case == "other-manifest":
        info["manifest_sha256"] = "0" * 64
    elif case == "bad-name":
        cut["name"] = cut["file"] + ".part0002/../../../etc/passwd"
    else:
        info["pieces"] = [p for p in info["pieces"] if p["file"] != "models/m/config.json"]
    f = tmp_path / "SPLIT.json"
    f.write_bytes(canonical_json(info))
    b = Bundle.load(vols[0])
    with pytest.raises(BundleError) as ei:
        Volumes.load(vols[0], f, {a.path: a.size for a in b.artifacts}, b.manifest_sha256)
    print(f"{case}: {ei.value.message}")
