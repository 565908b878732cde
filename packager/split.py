"""Split a bundle into volumes for removable media (FAT32 USB disks) and join them again.

Layout of ``pack split out/qwen3-32b-2026.11.21 --size 3.9G``::

    out/qwen3-32b-2026.11.21.vol01/   MANIFEST.json  MANIFEST.json.sig  install.sh  SPLIT.json  VOLUME.sha256
                                      installer.tar.gz  runtime/...  envs/vllm.tar.zst.part0001
    out/qwen3-32b-2026.11.21.vol02/   VOLUME.sha256  envs/vllm.tar.zst.part0002  models/...

Every volume holds at most ``max_size`` bytes (its ``VOLUME.sha256`` included) and no file larger than
4 GiB - 1 (FAT32). A file that does not fit is cut into ``<path>.partNNNN`` pieces, numbered from 0001
across volumes in order. ``VOLUME.sha256`` is in ``sha256sum`` format, so ``cd VOL && sha256sum -c
VOLUME.sha256`` checks a volume on any machine. ``SPLIT.json`` (first volume, canonical JSON) lists the
volumes and every artifact's pieces (file, name, volume, offset, size). Nothing joins them on the target:
``install.sh`` copies the few files it runs from their pieces, and the Python installer reads every other
artifact in place (``installer/bundle/volumes.py``, ``installer/unpack/pieces.py``), each checked against
MANIFEST.json as for a whole bundle: the volume hashes only name the disk that went bad.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from installer.bundle import (
    INSTALL_SH,
    MANIFEST_NAME,
    PIECE_SUFFIX,
    SIGNATURE_NAME,
    SPLIT_INFO,
    VOLUME_INDEX,
    VOLUME_PREFIX,
    Bundle,
    canonical_json,
    check_relpath,
)
from installer.bundle.volumes import Volumes
from installer.errors import BundleError, IntegrityError, UsageError

FAT32_MAX_FILE = (4 << 30) - 1
SPLIT_FORMAT = 1
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KI": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MI": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GI": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TI": 1 << 40,
    "TIB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
DEFAULT_SIZE = "3.9G"
_MIN_SIZE = 64 << 10
_BUF = 4 << 20


def parse_size(text: str | int) -> int:
    """``"3.9G"`` → bytes. K/M/G/T (and KiB...) are powers of 1024; kB/MB/GB/TB are powers of 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"not a size: {text!r}", hint="write e.g. 3.9G, 700M, 25G or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def volume_name(bundle_name: str, index: int) -> str:
    return f"{bundle_name}.{VOLUME_PREFIX}{index:02d}"


def piece_name(path: str, number: int) -> str:
    return f"{path}{PIECE_SUFFIX}{number:04d}"


@dataclass(frozen=True)
class Piece:
    file: str  # path in the bundle
    name: str  # path in the volume (file itself, or file.partNNNN)
    volume: int  # 1-based
    offset: int
    size: int


def _index_line(name: str) -> int:
    return 64 + 2 + len(name.encode()) + 1


def _plan(sources: list[tuple[str, int]], fixed: list[tuple[str, int]], max_size: int) -> list[Piece]:
    """Assign (path, size) files to volumes; ``fixed`` files go first into volume 1, whole."""
    pieces: list[Piece] = []
    vol, room = 1, max_size
    for name, size in fixed:
        room -= size + _index_line(name)
    if room < _MIN_SIZE:
        raise UsageError(
            f"volume size {max_size} is too small for the bundle's first files",
            hint="use at least a few MiB per volume",
        )
    for path, size in sources:
        whole_cost = size + _index_line(path)
        if size <= FAT32_MAX_FILE and whole_cost <= room:
            pieces.append(Piece(path, path, vol, 0, size))
            room -= whole_cost
            continue
        if size <= FAT32_MAX_FILE and whole_cost <= max_size and room < max(_MIN_SIZE, size // 8):
            vol, room = vol + 1, max_size  # small file, little room left: start the next volume
            pieces.append(Piece(path, path, vol, 0, size))
            room -= whole_cost
            continue
        offset, number = 0, 1
        while offset < size or (size == 0 and number == 1):
            name = piece_name(path, number)
            take = min(size - offset, room - _index_line(name), FAT32_MAX_FILE)
            if take <= 0 or (take < _MIN_SIZE and take < size - offset):
                vol, room = vol + 1, max_size
                continue
            pieces.append(Piece(path, name, vol, offset, take))
            room -= take + _index_line(name)
            offset += take
            number += 1
    return pieces


def _split_info(bundle: Bundle, name: str, pieces: list[Piece], max_size: int) -> bytes:
    nvol = max((p.volume for p in pieces), default=1)
    split_files = sorted({p.file for p in pieces if p.name != p.file})
    return canonical_json(
        {
            "format_version": SPLIT_FORMAT,
            "bundle": name,
            "manifest_sha256": bundle.manifest_sha256,
            "max_size": max_size,
            "volumes": nvol,
            "volume_names": [volume_name(name, i) for i in range(1, nvol + 1)],
            "split_files": split_files,
            "pieces": [
                {"file": p.file, "name": p.name, "volume": p.volume, "offset": p.offset, "size": p.size}
                for p in pieces
            ],
        }
    )


def split_bundle(
    bundle_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], max_size: int | str = DEFAULT_SIZE
) -> list[Path]:
    """Cut the bundle into ``out_dir/<bundle>.volNN/`` directories of at most ``max_size`` bytes each.

    Every byte is hashed as it is copied and each artifact is checked against MANIFEST.json on the way,
    so a corrupt bundle is never split. Existing volumes of the same name are replaced.
    """
    max_size = parse_size(max_size)
    bundle = Bundle.load(bundle_dir)
    extra = bundle.unlisted_files()
    if extra:
        raise BundleError(
            f"{bundle.root}: file(s) not listed in {MANIFEST_NAME}: {', '.join(extra[:5])}",
            hint="run `pack verify` on the bundle; remove what was added after the build",
        )
    name = bundle.root.name
    for a in bundle.artifacts:
        if "\n" in a.path or "\r" in a.path:
            raise BundleError(f"{a.path!r}: a newline in a file name cannot be listed in {VOLUME_INDEX}")
    head = [MANIFEST_NAME] + ([SIGNATURE_NAME] if (bundle.root / SIGNATURE_NAME).exists() else [])
    # bootstrap first (install.sh, the installer, the runtime): the first disk can start the install; the small
    # SBOM right after install.sh, so `pack sbom` reads it from the first disk
    order = {"bootstrap": 0, "sbom": 0.5, "installer": 1, "runtime": 2, "environment": 3, "model": 4}
    arts = sorted(bundle.artifacts, key=lambda a: (order.get(a.kind, 5), a.path))
    sources = [(a.path, a.size) for a in arts if a.path != INSTALL_SH]
    fixed = [(h, (bundle.root / h).stat().st_size) for h in head]
    if any(a.path == INSTALL_SH for a in arts):
        fixed.append((INSTALL_SH, bundle.artifact(INSTALL_SH).size))
    reserve = 4096
    while True:
        pieces = _plan(sources, [*fixed, (SPLIT_INFO, reserve)], max_size)
        info = _split_info(bundle, name, pieces, max_size)
        if len(info) <= reserve:
            break
        reserve = len(info) + 4096
    nvol = max((p.volume for p in pieces), default=1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = [out_dir / f".{volume_name(name, i)}.partial" for i in range(1, nvol + 1)]
    finals = [out_dir / volume_name(name, i) for i in range(1, nvol + 1)]
    try:
        for d in staging:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        index: list[list[tuple[str, str]]] = [[] for _ in range(nvol)]
        for h in head:
            index[0].append((_copy(bundle.root / h, staging[0] / h), h))
        if any(a.path == INSTALL_SH for a in arts):
            index[0].append((_copy(bundle.path_of(INSTALL_SH), staging[0] / INSTALL_SH), INSTALL_SH))
        (staging[0] / SPLIT_INFO).write_bytes(info)
        index[0].append((hashlib.sha256(info).hexdigest(), SPLIT_INFO))
        _write_pieces(bundle, pieces, staging, index)
        for i, d in enumerate(staging):
            lines = "".join(f"{digest}  {n}\n" for digest, n in index[i])
            (d / VOLUME_INDEX).write_text(lines, encoding="utf-8")
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            if size > max_size:  # the plan guarantees it; never write a volume that does not fit its disk
                raise BundleError(f"internal error: volume {i + 1} is {size} bytes > {max_size}")
        for d, f in zip(staging, finals, strict=True):
            if f.exists():
                shutil.rmtree(f)
            os.replace(d, f)
        # volumes of an earlier split with more volumes would confuse install.sh
        for stale in out_dir.glob(f"{name}.{VOLUME_PREFIX}[0-9][0-9]"):
            if stale not in finals:
                shutil.rmtree(stale)
    finally:
        for d in staging:
            shutil.rmtree(d, ignore_errors=True)
    return finals


def _copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while b := fi.read(_BUF):
            h.update(b)
            fo.write(b)
    return h.hexdigest()


def _write_pieces(
    bundle: Bundle, pieces: list[Piece], staging: list[Path], index: list[list[tuple[str, str]]]
) -> None:
    by_file: dict[str, list[Piece]] = {}
    for p in pieces:
        by_file.setdefault(p.file, []).append(p)
    for path, parts in by_file.items():
        art = bundle.artifact(path)
        whole = hashlib.sha256()
        with open(bundle.path_of(art), "rb") as fi:
            for p in parts:
                dst = staging[p.volume - 1].joinpath(*p.name.split("/"))
                dst.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                left = p.size
                with open(dst, "wb") as fo:
                    while left:
                        b = fi.read(min(_BUF, left))
                        if not b:
                            raise IntegrityError(
                                path, expected=f"{art.size} bytes", actual="a shorter file", what="size"
                            )
                        h.update(b)
                        whole.update(b)
                        fo.write(b)
                        left -= len(b)
                index[p.volume - 1].append((h.hexdigest(), p.name))
            if fi.read(1):
                raise IntegrityError(path, expected=f"{art.size} bytes", actual="a longer file", what="size")
        if whole.hexdigest() != art.sha256:
            raise IntegrityError(
                path,
                expected=art.sha256,
                actual=whole.hexdigest(),
                hint="the bundle is corrupt: run `pack verify`, rebuild, then split again",
            )


# --------------------------------------------------------------------------- joining (Python side)


def read_split_info(first_volume: str | os.PathLike[str]) -> dict:
    p = Path(first_volume) / SPLIT_INFO
    try:
        info = json.loads(p.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(
            f"{p}: cannot read the split description ({e})",
            hint="run install.sh from the first volume (the one with SPLIT.json)",
        ) from e
    if info.get("format_version") != SPLIT_FORMAT:
        raise BundleError(f"{p}: split format {info.get('format_version')!r} is not supported")
    return info


def find_volumes(
    first_volume: str | os.PathLike[str], search: Iterable[str | os.PathLike[str]] = ()
) -> list[Path]:
    """The volume directories in order: siblings of the first volume, or inside/at the ``search`` dirs (where
    the installer looks: :class:`installer.bundle.volumes.Volumes`)."""
    first = Path(first_volume)
    read_split_info(first)
    b = Bundle.load(first)
    vols = Volumes.load(first, first / SPLIT_INFO, {a.path: a.size for a in b.artifacts}, b.manifest_sha256,
                        search=search)
    return [vols.where(i) for i in range(1, vols.count + 1)]


_INDEX_LINE = re.compile(r"([0-9a-f]{64})  ([^\n\r\x00\\]+)")


def check_volume(vol: str | os.PathLike[str], number: int | None = None) -> None:
    """Check one volume against its VOLUME.sha256 (what ``sha256sum -c`` does); names the first bad file.

    Reads only: every listed name must be a plain relative path inside the volume (no ``..``, no
    absolute path, no backslash, NUL or newline) naming a regular file that is not a symlink; anything
    else is refused before a byte is read. (Nothing joins volumes: the installer reads each artifact in place.)
    """
    vol = Path(vol)
    label = f"volume {number} ({vol})" if number else str(vol)
    index = vol / VOLUME_INDEX
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{label}: cannot read {VOLUME_INDEX} ({e})",
                          hint="this disk's copy is damaged: copy that volume again") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _INDEX_LINE.fullmatch(line)
        if m is None:
            raise BundleError(f"{label}: {VOLUME_INDEX}:{lineno}: not a `sha256  name` line: {line[:80]!r}",
                              hint="this volume was not written by `pack split`; do not use it")
        digest, name = m.groups()
        try:
            check_relpath(name, what=f"file name in {VOLUME_INDEX}")
        except BundleError as e:
            raise BundleError(f"{label}: {VOLUME_INDEX}:{lineno}: unsafe file name {name!r}",
                              hint="this volume was not written by `pack split`; do not use it") from e
        p = vol.joinpath(*name.split("/"))
        parent = p.parent
        while parent != vol:  # no symlinked directory on the way out of the volume
            if parent.is_symlink():
                raise BundleError(f"{label}: {name}: {parent.relative_to(vol)} is a symlink",
                                  hint="this volume was not written by `pack split`; do not use it")
            parent = parent.parent
        try:
            st = p.lstat()
        except FileNotFoundError:
            raise IntegrityError(f"{label}: {name}", expected=digest, actual="missing", what="file") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{label}: {name}", expected="regular file", actual="not a regular file",
                                 what="type")
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while b := f.read(_BUF):
                h.update(b)
        if h.hexdigest() != digest:
            raise IntegrityError(
                f"{label}: {name}",
                expected=digest,
                actual=h.hexdigest(),
                hint="this disk's copy is damaged: copy that volume again",
            )
