"""Reading bundle files: never through a link or a FIFO, every byte hashed, decompressed in chunks.

A source is a bundle file's path, or the :class:`~installer.unpack.pieces.Pieces` of an artifact on split
volumes (read in place, never joined): :func:`open_source` opens either.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from installer.errors import BundleError
from installer.unpack.pieces import Pieces

CHUNK = 1 << 20

Source = str | os.PathLike[str] | Pieces  # a bundle file, or an artifact's pieces on split volumes


def open_regular(path: str | os.PathLike[str]):
    """Open a bundle file for reading: never through a symlink, never blocking on a FIFO or a device.

    The type is checked on the open descriptor (``fstat``), so a file swapped for a link or a FIFO after an
    earlier look is refused here rather than followed or waited on forever.
    """
    hint = "copy the bundle again (a bundle holds plain files only)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path} is a symlink", hint=hint) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path} is not a regular file", hint=hint)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=0)


def open_source(src: Source):
    """A binary file object (``read``, ``readinto``, ``close``) over a bundle file or an artifact's pieces."""
    if isinstance(src, Pieces):
        return src.open()
    return open_regular(src)


def source_name(src: Source) -> str:
    return src.name if isinstance(src, Pieces) else Path(src).name


class _HashingSource:
    """Reads ``path`` in chunks, hashing every byte; ``read`` never returns more than asked."""

    def __init__(self, path: Source) -> None:
        self.f = open_source(path)
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(CHUNK if n is None or n < 0 else n)
        if data:
            self.sha.update(data)
            self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self.f.close()


class _Plain:
    """A read-only file object over ``produce``, a zero-argument callable returning the next decompressed
    chunk (``b""`` at the end). ``view`` hands out slices without copying."""

    def __init__(self, produce: Callable[[], bytes]) -> None:
        self._produce = produce
        self._buf = memoryview(b"")
        self._pos = 0
        self._eof = False

    def _next(self) -> bytes:
        return self._produce()

    def view(self, n: int = -1) -> memoryview:
        if n is None or n < 0:
            n = 1 << 62
        if self._pos >= len(self._buf):
            if self._eof:
                return memoryview(b"")
            data = self._next()
            if not data:
                self._eof = True
                return memoryview(b"")
            self._buf, self._pos = memoryview(data), 0
        take = self._buf[self._pos : self._pos + n]
        self._pos += len(take)
        return take

    def read(self, n: int = -1) -> bytes:
        return bytes(self.view(n))

    def close(self) -> None:
        pass


def _decompressed_chunks(src: _HashingSource, compression: str) -> Callable[[], bytes]:
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(src, read_size=CHUNK, read_across_frames=True)
        return lambda: reader.read(CHUNK)
    if compression == "gzip":
        import gzip

        gz = gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[arg-type]
        return lambda: gz.read(CHUNK)
    if compression == "none":
        return lambda: src.read(CHUNK)
    raise ValueError(f"unknown compression {compression!r}")


def compression_of(path: Source) -> str:
    name = path.name if isinstance(path, Pieces) else os.fspath(path)
    if name.endswith((".tar.zst", ".tzst")):
        return "zstd"
    if name.endswith((".tar.gz", ".tgz")):
        return "gzip"
    if name.endswith(".tar"):
        return "none"
    raise BundleError(f"{name}: not a tar archive this installer knows (.tar.zst, .tar.gz, .tar)")
