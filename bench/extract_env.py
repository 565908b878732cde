"""Extraction throughput: installer.unpack (zstd + sha256 + safe tarfile, one pass) vs GNU `tar -xf`.

Usage:
    python bench/extract_env.py ARCHIVE.tar.zst [--rounds N] [--workdir DIR]
    python bench/extract_env.py --from-dir DIR          # pack DIR into a .tar + .tar.zst first
    python bench/extract_env.py --from-dir DIR --frames 2 --frames 4   # and as pack build frames it

The baseline is a plain `tar -xf` of the same archive already decompressed (what the issue asks us to
compare with), measured in the same run, on the same filesystem. The order of the contenders rotates from
round to round, because the cost of deleting the previous tree (ext4 frees and discards it in the
background) slows whatever runs next; each extraction is followed by `sync` and the tree is removed (and
synced) before the next one. Compare the best of several rounds.
Target: installer.unpack ≤ 1.2× tar -xf.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.threaded_reader import ThreadedReader
from installer.unpack import extract_archive


def _sync() -> None:
    os.sync()


def _decompress(zst: Path, tar: Path) -> None:
    import zstandard

    with open(zst, "rb") as i, open(tar, "wb") as o:
        zstandard.ZstdDecompressor().copy_stream(i, o, read_size=1 << 20, write_size=1 << 20)


def _pack(src: Path, work: Path) -> Path:
    import zstandard

    tar = work / "env.tar"
    subprocess.run(["tar", "-C", str(src.parent), "-cf", str(tar), src.name], check=True)
    zst = work / "env.tar.zst"
    with open(tar, "rb") as i, open(zst, "wb") as o:
        zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(i, o)
    tar.unlink()
    return zst


def _pack_framed(src: Path, work: Path) -> tuple[Path, list]:
    """The tree as `pack build` frames it: directories and symlinks in frame 0, then regular files in frames of
    packager.env.pack.FRAME_BYTES of tar each (independent zstd frames, each hashed)."""
    import zstandard

    from installer.unpack.frames import Frame
    from packager.env.pack import FRAME_BYTES, _FrameHasher
    from packager.env.tarstream import TarStream

    entries = sorted(p for p in src.rglob("*"))
    zst = work / "framed.tar.zst"
    buf = bytearray(1 << 20)
    with open(zst, "wb") as raw:
        hw = _FrameHasher(raw)
        with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(hw, closefd=False) as zw:
            tar = TarStream(zw)
            for p in entries:
                rel = p.relative_to(src).as_posix()
                if p.is_symlink():
                    tar.add_symlink(rel, os.readlink(p))
                elif p.is_dir():
                    tar.add_dir(rel)
            start = tar.offset
            for p in entries:
                if p.is_file() and not p.is_symlink():
                    if tar.offset > start and (start == 0 or tar.offset - start >= FRAME_BYTES):
                        zw.flush(zstandard.FLUSH_FRAME)
                        hw.end_frame()
                        start = tar.offset
                    st = p.stat()
                    tar.add_file(p.relative_to(src).as_posix(), str(p), st.st_size, st.st_mode, buf)
            tar.close()
        hw.end_frame()
    return zst, [Frame(*f) for f in hw.frames]


def make_tree(dest: Path, files: int, total: int, seed: int = 1) -> Path:
    """A synthetic tree shaped like a vLLM environment: many small files (.py, metadata) in nested package dirs,
    a few hundred large shared libraries holding most of the bytes; content about 3-4x compressible."""
    import random

    rng = random.Random(seed)
    big = max(1, files // 200)  # ~0.5% of the files hold ~85% of the bytes (.so files)
    small_total = total * 15 // 100
    sizes = [max(1, int(rng.expovariate(1.0) * small_total / (files - big))) for _ in range(files - big)]
    sizes += [max(1, (total - small_total) // big)] * big
    rng.shuffle(sizes)
    text = (b"def f(x):\n    return x * 2  # comment\n" * 2000)[: 1 << 16]
    for i, n in enumerate(sizes):
        d = dest / f"pkg{i % 97}" / f"sub{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i}.{'so' if n > 1 << 20 else 'py'}", "wb") as f:
            left = n
            while left > 0:  # a quarter random bytes, the rest text: compresses ~3.5x like an env
                k = min(left, 1 << 16)
                f.write(os.urandom(k) if rng.random() < 0.25 else text[:k])
                left -= k
    for i in range(files // 100):  # and symlinks, like bin/python -> python3.X
        (dest / f"pkg{i % 97}" / f"link{i}").symlink_to(f"sub{i % 13}")
    return dest


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", nargs="?", type=Path)
    ap.add_argument("--from-dir", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument(
        "--workers",
        type=int,
        action="append",
        help="writer threads of installer.unpack to measure (repeatable; default: the default)",
    )
    ap.add_argument("--synthetic", metavar="FILES:BYTES", help="make a tree of that shape first (e.g. 57141:3519M)")
    ap.add_argument("--frames", type=int, action="append",
                    help="with --from-dir: also measure the framed archive (what pack build writes) decoded by "
                    "N threads (repeatable)")
    ap.add_argument(
        "--read-ahead",
        action="store_true",
        help="also measure with reading, hashing and decompressing in a separate thread",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.workdir))
    try:
        framed = None
        if args.synthetic:
            n, size = args.synthetic.split(":")
            mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(size[-1].upper(), 1)
            t = time.perf_counter()
            args.from_dir = make_tree(work / "tree", int(n), int(float(size.rstrip("KMGkmg")) * mult))
            print(f"synthetic tree: {n} files, {size} in {time.perf_counter() - t:.1f} s")
        if args.from_dir:
            zst = _pack(args.from_dir, work)
            if args.frames:
                framed = _pack_framed(args.from_dir, work)
                print(f"framed archive: {len(framed[1])} frames, {framed[0].stat().st_size / 1e6:.0f} MB")
        elif args.archive:
            zst = args.archive
        else:
            ap.error("give ARCHIVE or --from-dir")
        tar = work / "plain.tar"
        _decompress(zst, tar)
        sha = _sha256(zst)
        zsize, tsize = zst.stat().st_size, tar.stat().st_size
        print(f"archive {zst} {zsize / 1e6:.0f} MB zstd, {tsize / 1e6:.0f} MB as tar")
        from installer.unpack import DEFAULT_WORKERS

        variants = args.workers or [DEFAULT_WORKERS]
        times: dict[str, list[float]] = {"tar -xf (plain .tar)": []}
        for w in variants:
            times[f"installer.unpack (.tar.zst) w={w}"] = []
            if args.read_ahead:
                times[f"installer.unpack (.tar.zst) ra w={w}"] = []
        for j in (args.frames or []) if framed else []:
            times[f"installer.unpack frames j={j}"] = []
        members = 0
        labels = list(times)
        for r in range(args.rounds):
            # rotate the order: the first extraction of a round meets a disk still busy with the last delete
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                dest = work / f"out-{r}"
                _sync()
                t = time.perf_counter()
                if label.startswith("tar"):
                    dest.mkdir()
                    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
                elif " frames " in label:
                    from installer.unpack.frames import extract_frames

                    path, frames = framed
                    res = extract_frames(path, dest, frames, expected_size=path.stat().st_size,
                                         workers=int(label.rsplit("j=", 1)[1]))
                    members = res.members
                else:
                    w = int(label.rsplit("w=", 1)[1])
                    res = extract_archive(
                        zst,
                        dest,
                        expected_sha256=sha,
                        expected_size=zsize,
                        workers=w,
                        read_ahead=ThreadedReader if " ra " in label else None,
                    )
                    members = res.members
                _sync()
                times[label].append(time.perf_counter() - t)
                shutil.rmtree(dest)
                _sync()
        best = {k: min(v) for k, v in times.items()}
        base = best["tar -xf (plain .tar)"]
        print(f"{members} members, {args.rounds} round(s), best of each (incl. sync):")
        for k, v in best.items():
            print(
                f"  {k:32s} {v:6.2f} s  {tsize / v / 1e6:7.0f} MB/s (tar bytes)  {v / base:4.2f}x  "
                f"all: {', '.join(f'{x:.2f}' for x in times[k])}"
            )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {rss:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
