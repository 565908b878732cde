"""Reading an artifact in place from its pieces on split volumes (:class:`Pieces`, :class:`PieceFile`).

A split bundle is never joined: each artifact is read once, straight from the ``.partNNNN`` pieces on the
volumes, by the same verifying readers as a whole bundle's files (copy.py, archive.py, frames.py), whose
sha256 (the artifact's, or each zstd frame's) covers every byte read. A piece is opened under its volume's
directory one component at a time, never through a symlink (``O_NOFOLLOW`` at every step), never waiting on
a FIFO; its type and size are checked on the open descriptor. A :class:`PieceFile` keeps at most one piece
open, so a volume read to its end can be unmounted while the next one is read (one drive, media in turn).

When a hash does not match, :meth:`Pieces.damaged` tells which piece is bad by its volume's VOLUME.sha256 (read
only then), so the error names the disk to copy again.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from installer.errors import BundleError, IntegrityError

CHUNK = 1 << 20


class Span(Protocol):
    """``size`` bytes at ``offset`` of the artifact: the file ``name`` of volume ``volume``
    (``installer.bundle.volumes.Span``)."""

    @property
    def volume(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...


class VolumeDirs(Protocol):
    """Where the volumes are (``installer.bundle.volumes.Volumes``)."""

    def where(self, number: int) -> Path: ...  # its directory, perhaps after waiting for it
    def locate(self, number: int) -> Path | None: ...  # its directory if mounted now
    def label(self, number: int) -> str: ...


class _Pinned:
    """Volume directories resolved once (picklable: for worker processes, which never wait for a volume)."""

    def __init__(self, dirs: dict[int, str], labels: dict[int, str]) -> None:
        self.dirs, self.labels = dirs, labels

    def where(self, number: int) -> Path:
        return Path(self.dirs[number])

    def locate(self, number: int) -> Path | None:
        return Path(self.dirs[number]) if number in self.dirs else None

    def label(self, number: int) -> str:
        return self.labels[number]


@dataclass(frozen=True)
class Pieces:
    """One artifact's bytes as pieces on volumes. ``volumes`` gives ``where(n)`` (a directory, possibly after
    waiting for it to be mounted), ``locate(n)`` (a directory if mounted now) and ``label(n)``."""

    name: str
    size: int
    spans: tuple[Span, ...]
    volumes: VolumeDirs = field(repr=False)

    def open(self) -> PieceFile:
        return PieceFile(self)

    def volume_numbers(self, start: int = 0, end: int | None = None) -> list[int]:
        end = self.size if end is None else end
        return sorted({s.volume for s in self.spans if s.offset < end and s.offset + s.size > start}
                      | ({self.spans[0].volume} if self.size == 0 else set()))

    def pinned(self) -> Pieces:
        """The same pieces with every volume located now (for worker processes; raises if one is missing)."""
        nums = self.volume_numbers()
        v = self.volumes
        dirs = {n: os.fspath(v.where(n)) for n in nums}
        return Pieces(self.name, self.size, self.spans, _Pinned(dirs, {n: v.label(n) for n in nums}))

    def all_mounted(self) -> bool:
        return all(self.volumes.locate(n) is not None for n in self.volume_numbers())

    def label(self, span: Span) -> str:
        return f"{self.volumes.label(span.volume)}: {span.name}"

    def damaged(self, index: Callable[[int], dict[str, str]], start: int = 0, end: int | None = None) -> str | None:
        """The first piece overlapping bytes [start, end) whose sha256 is not its VOLUME.sha256 line, as
        ``volume N (DIR): NAME is corrupted (sha256 mismatch)``; None when every piece there matches."""
        end = self.size if end is None else end
        for s in self.spans:
            if s.offset >= end or s.offset + s.size <= start:
                continue
            want = index(s.volume).get(s.name)
            d = self.volumes.locate(s.volume)
            if want is None or d is None:
                continue
            try:
                with _open_piece(d, s, self.label(s)) as f:
                    h = hashlib.sha256()
                    while b := f.read(CHUNK):
                        h.update(b)
            except (OSError, BundleError):
                continue
            if h.hexdigest() != want:
                return f"volume {s.volume} ({d}): {s.name} is corrupted (sha256 mismatch)"
        return None


def _open_piece(vol: Path, span: Span, label: str):
    """Open ``span.name`` under the volume directory ``vol``: no symlink at any step, no FIFO, its exact size."""
    hint = "copy that volume again (a volume holds plain files only)"
    parts = span.name.split("/")
    try:
        fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BundleError(f"{label}: cannot open the volume directory {vol} ({e.strerror or e})",
                          hint="mount the volume again and run the same command again") from e
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BundleError(f"{label}: {'/'.join(parts[:i + 1])} is a symlink or not a directory",
                                      hint=hint) from e
                if e.errno == errno.ENOENT:
                    raise IntegrityError(label, expected=f"a file of {span.size} bytes", actual="missing",
                                         what="file", hint="copy that volume again") from e
                raise
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{label} is not a regular file", hint=hint)
        if st.st_size != span.size:
            raise IntegrityError(label, expected=str(span.size), actual=str(st.st_size), what="size",
                                 hint="copy that volume again")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb", buffering=0)
        fd = -1
        return f
    finally:
        if fd >= 0:
            os.close(fd)


class PieceFile:
    """A read-only file over an artifact's pieces: ``read``/``readinto`` in order, ``pread`` at an offset.
    At most one piece is open at a time (the one being read)."""

    def __init__(self, pieces: Pieces) -> None:
        self.p = pieces
        self.size = pieces.size
        self.pos = 0
        self._starts = [s.offset for s in pieces.spans]
        self._span: Span | None = None
        self._f = None

    def _piece(self, pos: int) -> Span:
        return self.p.spans[bisect.bisect_right(self._starts, pos) - 1]

    def _use(self, span: Span):
        if self._span is not span:
            self._close_piece()
            self._f = _open_piece(self.p.volumes.where(span.volume), span, self.p.label(span))
            self._span = span
        return self._f

    def _close_piece(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f, self._span = None, None

    def _at(self, pos: int, n: int, into: memoryview | None) -> bytes | int:
        span = self._piece(pos)
        f = self._use(span)
        want = min(n, span.offset + span.size - pos)
        if into is None:
            data: bytes | int = os.pread(f.fileno(), want, pos - span.offset)
            got = len(data)  # type: ignore[arg-type]
        else:
            data = got = os.preadv(f.fileno(), [into[:want]], pos - span.offset)
        if not got:
            raise BundleError(f"{self.p.label(span)} ended early (it changed while being read?)",
                              hint="copy that volume again")
        if pos + got >= span.offset + span.size:
            self._close_piece()  # this piece is read to its end: its volume may go
        return data

    def pread(self, n: int, pos: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` (fewer at a piece's end; ``b""`` at the artifact's end)."""
        if pos >= self.size or n <= 0:
            return b""
        return self._at(pos, n, None)  # type: ignore[return-value]

    def read(self, n: int = -1) -> bytes:
        data = self.pread(CHUNK if n is None or n < 0 else n, self.pos)
        self.pos += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.pos >= self.size or not len(buf):
            return 0
        got = self._at(self.pos, len(buf), memoryview(buf).cast("B"))
        self.pos += got  # type: ignore[operator]
        return got  # type: ignore[return-value]

    def close(self) -> None:
        self._close_piece()

    def __enter__(self) -> PieceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

