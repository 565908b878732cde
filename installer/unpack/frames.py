"""Parallel verified extraction of an environment archive written as independent zstd frames.

``pack build`` writes ``envs/<env>.tar.zst`` as one valid ``.tar.zst`` (``tar -I zstd -xf`` reads it) made of
independent zstd frames, each starting at a tar member, and lists every frame's byte range and sha256 in
MANIFEST.json (``environments[].frames``, covered by the signature). Frame 0 holds the directories and
symlinks; every later frame holds regular files only. So:

- frame 0 is extracted first, alone; then the other frames are read, hashed, decompressed and written by
  ``workers`` processes at once (each opens the archive itself; tar parsing is Python, so threads would
  share one GIL);
- every byte of the archive belongs to exactly one frame and is hashed by the thread that uses it; nothing
  leaves the destination directory before every frame's hash matched (the caller renames it only then;
  on any failure it is removed here);
- a later frame may not hold a link or a directory, may not name a file twice (``O_EXCL``) and may not write
  through a symlink (the rules of :func:`installer.unpack.members.check_member`, with frame 0's symlinks).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from installer.errors import BundleError, IntegrityError, UnsafeArchiveError
from installer.unpack.archive import ExtractResult, _is_stream_error
from installer.unpack.pieces import Pieces
from installer.unpack.source import CHUNK, Source, _Plain, open_regular, source_name
from installer.unpack.writer import _Writer


@dataclass(frozen=True)
class Frame:
    offset: int
    size: int
    sha256: str


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


class _Cancelled(Exception):
    pass


class _RangeSource:
    """Reads exactly ``size`` bytes at ``offset`` of an artifact, hashing them: ``pread(n, pos)`` is ``os.pread``
    on a shared descriptor (no shared position) or :meth:`PieceFile.pread` across the pieces of split volumes."""

    def __init__(self, pread: Callable[[int, int], bytes], offset: int, size: int, stop: threading.Event) -> None:
        self.pread, self.pos, self.end = pread, offset, offset + size
        self.sha = hashlib.sha256()
        self.size = 0
        self.stop = stop

    def read(self, n: int = -1) -> bytes:
        if self.stop.is_set():
            raise _Cancelled
        want = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        if want <= 0:
            return b""
        data = self.pread(min(want, CHUNK), self.pos)
        if not data:
            raise BundleError("the archive ended early (it changed while being read?)")
        self.pos += len(data)
        self.size += len(data)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _fd_pread(fd: int) -> Callable[[int, int], bytes]:
    return lambda n, pos: os.pread(fd, n, pos)


class _FilesOnlyWriter(_Writer):
    """A later frame's writer: regular files only, each created new (``O_EXCL``), never through a link."""

    def _open(self, path: str, mode: int) -> int:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except FileExistsError:
            rel = os.path.relpath(path, self.dest)
            raise UnsafeArchiveError(self.archive, rel, "named twice (in two parts of the archive)") from None


def check_frames(frames: Sequence[Frame], size: int, name: str) -> None:
    """The frames cover the archive exactly, in order, with nothing between them."""
    pos = 0
    for i, f in enumerate(frames):
        if f.offset != pos or f.size <= 0:
            raise BundleError(f"{name}: frame {i} starts at byte {f.offset}, expected {pos}",
                              hint="the manifest was not produced by `pack build`; do not install this bundle")
        pos += f.size
    if pos != size:
        raise IntegrityError(name, expected=f"{pos} bytes (its frames)", actual=f"{size} bytes", what="size")


def _extract_one(pread: Callable[[int, int], bytes], i: int, fr: Frame, w: _Writer, name: str,
                 stop: threading.Event) -> tuple[int, int]:
    """Read, hash, decompress and write frame ``i`` with writer ``w``; (members, bytes written)."""
    import zstandard

    src = _RangeSource(pread, fr.offset, fr.size, stop)
    members = out = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_size=CHUNK)
        fileobj = _Plain(lambda: reader.read(CHUNK))
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:  # type: ignore[call-overload]
            for m in tar:
                if i and not m.isreg():
                    raise UnsafeArchiveError(name, m.name, "a link or directory after the first part")
                members += 1
                out += w.add(m, tar.fileobj)
        while fileobj.read(CHUNK):
            pass
        w.close()
        src.drain()
    except (BundleError, _Cancelled):
        w.close_quietly()
        raise
    except Exception as e:
        w.close_quietly()
        if stop.is_set():
            raise _Cancelled from e
        src.drain()  # a corrupt frame: its hash tells corruption from a broken build
        _check(name, i, src, fr, cause=e)
        if _is_stream_error(e):
            raise BundleError(f"{name}: part {i} cannot be read ({type(e).__name__}: {e})",
                              hint="its hash matches MANIFEST.json, so it was built broken; rebuild the bundle") from e
        raise
    _check(name, i, src, fr)
    return members, out


def _in_process(archive: str | Pieces, i: int, fr: Frame, dest: str, name: str,
                symlinks: frozenset[str]) -> tuple[int, int]:
    """One later frame in a worker process (no GIL shared with the others): opens the archive itself (a path,
    or pieces whose volumes were located before: a worker never waits for one)."""
    with _Preader(archive) as (pread, _size):
        w = _FilesOnlyWriter(name, Path(dest), 0)
        w.symlinks = set(symlinks)
        return _extract_one(pread, i, fr, w, name, threading.Event())


def _process_pool(n: int):
    """A pool of ``n`` forked workers, or None where the system cannot make one (no /dev/shm for its locks,
    a process limit): the frames are then decoded by threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork"))
    except (OSError, ImportError, ValueError):
        return None


class _Preader:
    """``with _Preader(src) as (pread, size)``: a bundle file (one descriptor) or an artifact's pieces."""

    def __init__(self, src: Source) -> None:
        if isinstance(src, Pieces):
            self.f = src.open()
            self.pread, self.size = self.f.pread, src.size
        else:
            self.f = open_regular(src)
            self.pread, self.size = _fd_pread(self.f.fileno()), os.fstat(self.f.fileno()).st_size

    def __enter__(self) -> tuple[Callable[[int, int], bytes], int]:
        return self.pread, self.size

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def extract_frames(archive: Source, dest: str | os.PathLike[str], frames: Sequence[Frame], *,
                   expected_size: int, display_name: str | None = None, workers: int | None = None,
                   processes: bool = True) -> ExtractResult:
    """Extract a framed archive into ``dest`` (new or empty), every frame verified; ``dest`` removed on failure.

    Frame 0 first (this process); then the others on ``workers`` worker processes (``processes=False``:
    threads, which share one GIL: tar parsing and per-file work do not scale on them). ``workers=1``: every
    frame in this thread, in order (pieces on volumes mounted one at a time are read front to back).
    ``archive`` is a bundle file or an artifact's pieces on split volumes (each frame reads its own).
    """
    pieces = archive if isinstance(archive, Pieces) else None
    archive = pieces or Path(archive)
    name = display_name or source_name(archive)
    t0 = time.perf_counter()
    n = workers or default_workers()
    opened = _Preader(archive)
    try:
        pread, size = opened.pread, opened.size
        if size != expected_size:
            raise IntegrityError(name, expected=str(expected_size), actual=str(size), what="size")
        check_frames(frames, size, name)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise BundleError(f"{dest}: extraction target is not empty")
        stop = threading.Event()
        first = _Writer(name, dest, min(4, default_workers()))
        counts: list[tuple[int, int]] = []

        def own_reader(i: int) -> tuple[int, int]:  # a thread's frame: its own descriptor(s) for pieces
            w = _FilesOnlyWriter(name, dest, 0)
            w.symlinks, w.dirs = first.symlinks, first.dirs  # read-only now (set.add is atomic)
            if pieces is None:
                return _extract_one(pread, i, frames[i], w, name, stop)
            with _Preader(pieces) as (own, _):
                return _extract_one(own, i, frames[i], w, name, stop)

        try:
            counts.append(_extract_one(pread, 0, frames[0], first, name, stop))
            if pieces is not None:
                opened.f.close()  # frame 0 is read: each later frame opens its own pieces (a volume may go)
            rest = list(range(1, len(frames)))
            if n == 1:
                for i in rest:
                    counts.append(own_reader(i))
                rest = []
            pool = _process_pool(min(n, len(rest))) if processes and n > 1 and len(rest) > 1 else None
            if pool is not None:
                src = pieces.pinned() if pieces is not None else os.fspath(archive)
                submit = lambda i: pool.submit(_in_process, src, i, frames[i],  # noqa: E731
                                               os.fspath(dest), name, frozenset(first.symlinks))
            else:
                pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="llm-frame")

                def submit(i: int):
                    return pool.submit(own_reader, i)
            errors: list[BaseException] = []
            with pool:
                futures = [submit(i) for i in rest]
                for fut in futures:
                    try:
                        counts.append(fut.result())
                    except BaseException as e:
                        if not errors:
                            stop.set()
                            for other in futures:
                                other.cancel()
                        errors.append(e)
            real = [e for e in errors if not isinstance(e, _Cancelled | CancelledError)]
            if errors:
                raise (real or errors)[0]
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    finally:
        opened.f.close()
    whole = hashlib.sha256(b"".join(bytes.fromhex(x.sha256) for x in frames)).hexdigest()
    return ExtractResult(sha256=whole, size=size, members=sum(c[0] for c in counts),
                         bytes_out=sum(c[1] for c in counts), seconds=time.perf_counter() - t0)


def _check(name: str, i: int, src: _RangeSource, fr: Frame, cause: BaseException | None = None) -> None:
    digest = src.sha.hexdigest()
    if src.size != fr.size or digest != fr.sha256:
        err = IntegrityError(f"{name} (part {i}, bytes {fr.offset}-{fr.offset + fr.size - 1})",
                             expected=fr.sha256, actual=digest)
        err.byte_range = (fr.offset, fr.offset + fr.size)  # which pieces of split volumes to look at
        raise err from cause
