"""Verify and extract bundle artifacts in one pass over their bytes.

An environment archive (``envs/<env>.tar.zst``) is read once: the raw bytes go through sha256 (the
artifact's hash in MANIFEST.json) and zstandard, and the decompressed stream straight into
:mod:`tarfile` in stream mode (``"r|"``) with the ``data`` filter (PEP 706) plus our own, stricter member
checks (no absolute paths, no ``..``, no links leaving the destination, no device nodes or fifos, no
setuid/setgid bits). Reading, hashing and decompressing run in a helper thread so that they overlap with
file creation (which is what an environment's extraction is bound by).

The hash is only known at the end of the stream, so extraction goes into a directory the caller will
rename only after success: on any failure (unsafe member, hash or size mismatch, corrupt stream) the
destination directory is removed before the error is raised.

Model files are copied with :func:`copy_verified` (hash while copying, temp name, rename).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from zlib import error as zlib_error

from installer.errors import BundleError, IntegrityError, UnsafeArchiveError

CHUNK = 1 << 20
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
_EOF = b""


@dataclass(frozen=True)
class ExtractResult:
    sha256: str  # of the archive as read (compressed bytes)
    size: int  # archive bytes read
    members: int
    bytes_out: int  # decompressed bytes of regular files written
    seconds: float


# --------------------------------------------------------------------------- reading


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


class _HashingSource:
    """Reads ``path`` in chunks, hashing every byte; ``read`` never returns more than asked."""

    def __init__(self, path: Path) -> None:
        self.f = open_regular(path)
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


class _ThreadedReader(_Plain):
    """:class:`_Plain` fed by a producer thread (read + hash + decompress overlap with extraction).

    Exceptions in the producer are re-raised in the consumer.
    """

    def __init__(self, produce: Callable[[], bytes], depth: int = 16) -> None:
        super().__init__(produce)
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-extract-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._produce()
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed over to the consumer
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bytes:
        item = self._q.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


def compression_of(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if name.endswith((".tar.zst", ".tzst")):
        return "zstd"
    if name.endswith((".tar.gz", ".tgz")):
        return "gzip"
    if name.endswith(".tar"):
        return "none"
    raise BundleError(f"{name}: not a tar archive this installer knows (.tar.zst, .tar.gz, .tar)")


# --------------------------------------------------------------------------- member checks


def _parts(path: str) -> list[str]:
    return [x for x in path.split("/") if x not in ("", ".")]


def check_member(archive: str, m: tarfile.TarInfo, symlinks: set[str]) -> None:
    """Refuse members that could write outside the destination or are not plain data.

    The rules are lexical and need no file-system look-ups (tarfile's ``data`` filter calls ``realpath`` for
    every member, which costs more than the file creation itself on a 60k-file environment), and they are
    stricter than that filter, so that no order of members can escape:

    - no absolute path, no ``..`` in a member's path, no path through a symlink the archive created;
    - a symlink's target is relative, ``..`` may only lead it (``../../lib/x``) and may not climb above the
      destination from where the link is; a hard link's target is a plain path inside the archive;
    - no device nodes, fifos or other special files; no setuid/setgid bits.

    ``symlinks`` holds the normalised names of the symlinks seen so far (updated here).

    ``install.sh``'s ``check_tar`` applies the same rules, in the same order, with the same reasons, to the
    bootstrap archives (it sees them through ``tar -tv``); tests/faults/test_archives.py runs one table of
    hostile and legitimate archives against both. Change them together.
    """
    name = m.name
    if name.startswith("/"):
        raise UnsafeArchiveError(archive, name, "absolute path")
    parts = _parts(name)
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' in the path")
    if not parts:
        if m.isdir():
            return
        raise UnsafeArchiveError(archive, name, "empty member name")
    if m.ischr() or m.isblk():
        raise UnsafeArchiveError(archive, name, "device node")
    if m.isfifo():
        raise UnsafeArchiveError(archive, name, "fifo")
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeArchiveError(archive, name, f"special file (tar type {m.type!r})")
    if m.mode & (stat.S_ISUID | stat.S_ISGID):
        raise UnsafeArchiveError(archive, name, "setuid/setgid bit")
    if symlinks:
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in symlinks:
                raise UnsafeArchiveError(archive, name, f"path goes through the symlink {prefix!r}")
    if m.issym():
        target = m.linkname
        if target.startswith("/"):
            raise UnsafeArchiveError(archive, name, f"symlink to an absolute path ({target})")
        tparts = _parts(target)
        ups = 0
        while ups < len(tparts) and tparts[ups] == "..":
            ups += 1
        if ".." in tparts[ups:]:
            raise UnsafeArchiveError(archive, name, f"symlink target with '..' inside it ({target})")
        if ups > len(parts) - 1:
            raise UnsafeArchiveError(archive, name, f"symlink leaves the destination ({target})")
        if not tparts:
            raise UnsafeArchiveError(archive, name, f"symlink to its own directory ({target!r})")
        symlinks.add("/".join(parts))
    elif m.islnk():
        target = m.linkname
        tparts = _parts(target)
        if target.startswith("/") or not tparts or ".." in tparts:
            raise UnsafeArchiveError(archive, name, f"hard link outside the archive ({target})")
        for i in range(1, len(tparts) + 1):
            if "/".join(tparts[:i]) in symlinks:
                raise UnsafeArchiveError(archive, name, f"hard link through a symlink ({target})")


class _Writer:
    """Creates checked members under ``dest`` with as few system calls as a member needs.

    The attribute rules are those of tarfile's ``data`` filter: ownership ignored (the installer's user owns
    what it extracts), modes limited to 0o755 with u+rw on files, directory modes ignored, mtimes kept
    (Python compares them with the ``.pyc`` files). Files are opened with ``O_NOFOLLOW``: never written
    through a link.

    Extracting an environment is bound by file creation, so small files are handed to ``workers`` threads
    (their system calls release the GIL) while this thread parses the next headers; directories and links
    are made here, in archive order, and a hard link or a name seen twice waits for the pending writes.
    """

    SMALL = 1 << 20

    def __init__(self, archive: str, dest: Path, workers: int) -> None:
        self.archive = archive
        self.dest = os.fspath(dest)
        self.symlinks: set[str] = set()
        self.dirs: set[str] = {self.dest}
        self.seen: set[str] = set()
        umask = os.umask(0)
        os.umask(umask)
        self.umask = umask
        self.workers = workers
        self._q: queue.Queue | None = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        if workers > 0:
            self._q = queue.Queue(maxsize=256)
            for i in range(workers):
                t = threading.Thread(target=self._work, name=f"llm-extract-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    # -- worker side
    def _work(self) -> None:
        q = self._q
        assert q is not None
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write_small(*item)
            except BaseException as e:  # reported by the parsing thread
                if self._error is None:
                    self._error = e
            finally:
                q.task_done()

    def _open(self, path: str, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, mode)
        except OSError:
            if os.path.islink(path):  # a later member replaces an earlier link (never writes through it)
                os.unlink(path)
                return os.open(path, flags, mode)
            raise

    def _write_small(self, path: str, data: bytes, mode: int, mtime: float) -> None:
        fd = self._open(path, mode)
        try:
            if data:
                _write_all(fd, data)
            if mode & ~self.umask != mode:
                os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    # -- parsing side
    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error

    def barrier(self) -> None:
        if self._q is not None:
            self._q.join()
        self._check_error()

    def close(self) -> None:
        """Wait for the pending writes and stop the workers (raises a worker's error)."""
        if self._q is not None:
            for _ in self._threads:
                self._q.put(None)
            for t in self._threads:
                t.join()
            self._q = None
        self._check_error()

    def close_quietly(self) -> None:
        try:
            self.close()
        except BaseException:
            pass

    def _parent(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent not in self.dirs:
            os.makedirs(parent, exist_ok=True)
            self.dirs.add(parent)

    def add(self, m: tarfile.TarInfo, stream) -> int:
        check_member(self.archive, m, self.symlinks)
        rel = "/".join(_parts(m.name))
        if not rel:
            return 0
        path = f"{self.dest}/{rel}"
        if m.isdir():
            if path not in self.dirs:
                os.makedirs(path, exist_ok=True)
                self.dirs.add(path)
            return 0
        self._parent(path)
        if path in self.seen:  # the archive names it twice: the later one wins, after the earlier is written
            self.barrier()
        self.seen.add(path)
        if m.isreg():
            mode = (m.mode & 0o755) | 0o600
            if not mode & 0o100:
                mode &= ~0o111
            if self._q is not None and m.size <= self.SMALL:
                data = stream.read(m.size)
                if len(data) != m.size:
                    raise tarfile.ReadError(f"unexpected end of data in {m.name!r}")
                self._check_error()
                self._q.put((path, data, mode, m.mtime))
            else:
                self._file(path, m, mode, stream)
            return m.size
        if m.islnk():
            self.barrier()  # the target must be on disk
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                raise UnsafeArchiveError(self.archive, m.name, "a link would replace a directory")
            os.unlink(path)
        if m.issym():
            os.symlink(m.linkname, path)
        else:
            os.link(f"{self.dest}/{'/'.join(_parts(m.linkname))}", path, follow_symlinks=False)
        return 0

    def _file(self, path: str, m: tarfile.TarInfo, mode: int, stream) -> None:
        fd = self._open(path, mode)
        try:
            _copy_member_data(stream, m, fd)
            if mode & ~self.umask != mode:
                os.fchmod(fd, mode)
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)


def _copy_member_data(stream, m: tarfile.TarInfo, fd: int) -> None:
    """Write the ``m.size`` data bytes at the stream's position to ``fd``.

    tarfile's stream object re-buffers every read in small records and copies it twice; for large members
    this takes what it has buffered and then reads straight from our reader without copying, keeping the
    stream's position right (``buf``/``pos`` of ``tarfile._Stream``, unchanged since Python 3.2; any other
    stream falls back to plain reads).
    """
    left = m.size
    raw = getattr(stream, "fileobj", None)
    if (
        getattr(stream, "comptype", None) == "tar"
        and isinstance(getattr(stream, "buf", None), bytes)
        and isinstance(getattr(stream, "pos", None), int)
        and hasattr(raw, "view")
    ):
        buf = stream.buf
        k = min(len(buf), left)
        if k:
            _write_all(fd, buf[:k])
            stream.buf = buf[k:]
        done = k
        while done < left:
            data = raw.view(min(left - done, CHUNK))
            if not data:
                raise tarfile.ReadError(f"unexpected end of data in {m.name!r}")
            _write_all(fd, data)
            done += len(data)
        stream.pos += left
        return
    while left > 0:
        data = stream.read(min(left, CHUNK))
        if not data:
            raise tarfile.ReadError(f"unexpected end of data in {m.name!r}")
        _write_all(fd, data)
        left -= len(data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --------------------------------------------------------------------------- extraction


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    expected_sha256: str | None,
    expected_size: int | None = None,
    compression: str | None = None,
    display_name: str | None = None,
    workers: int | None = None,
    read_ahead: bool = False,
) -> ExtractResult:
    """Extract ``archive`` into ``dest`` (created; must be new or empty), verifying its sha256 on the way.

    On any failure ``dest`` is removed and the error raised: :class:`UnsafeArchiveError` for a refused member,
    :class:`IntegrityError` for a size/hash mismatch (also when the stream is corrupt and the hash says so),
    :class:`BundleError` for an unreadable archive whose hash matches.
    """
    archive = Path(archive)
    dest = Path(dest)
    name = display_name or archive.name
    compression = compression or compression_of(archive)
    t0 = time.perf_counter()
    if expected_size is not None:
        actual = archive.stat().st_size
        if actual != expected_size:
            raise IntegrityError(name, expected=str(expected_size), actual=str(actual), what="size")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"{dest}: extraction target is not empty")
    src = _HashingSource(archive)
    reader: _ThreadedReader | None = None
    members = 0
    bytes_out = 0
    try:
        produce = _decompressed_chunks(src, compression)
        fileobj = reader = _ThreadedReader(produce) if read_ahead else _Plain(produce)
        writer = _Writer(name, dest, DEFAULT_WORKERS if workers is None else workers)
        try:
            with tarfile.open(fileobj=fileobj, mode="r|") as tar:  # type: ignore[call-overload]
                for m in tar:
                    members += 1
                    # tarfile parsed the header and stands at the member's data: read exactly m.size bytes
                    bytes_out += writer.add(m, tar.fileobj)
                # the tar end marker may leave padding unread: hash everything
                while fileobj.read(CHUNK):
                    pass
            writer.close()
        except BundleError:
            writer.close_quietly()
            raise
        except Exception as e:
            writer.close_quietly()
            # corrupt stream, or the disk: finish hashing to tell corruption (hash mismatch) from the rest
            if reader is not None:
                reader.close()
            src.drain()
            _check_hash(name, src, expected_sha256, expected_size, cause=e)
            if _is_stream_error(e):
                raise BundleError(
                    f"{name}: the archive cannot be read ({type(e).__name__}: {e})",
                    hint="its hash matches MANIFEST.json, so it was built broken; rebuild the bundle",
                ) from e
            raise
        if reader is not None:
            reader.close()
        src.drain()
        _check_hash(name, src, expected_sha256, expected_size)
    except BaseException:
        if reader is not None:
            reader.close()
        src.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise
    src.close()
    return ExtractResult(
        sha256=src.sha.hexdigest(),
        size=src.size,
        members=members,
        bytes_out=bytes_out,
        seconds=time.perf_counter() - t0,
    )


def _is_stream_error(e: BaseException) -> bool:
    if isinstance(e, tarfile.ExtractError):
        return False
    return (
        isinstance(e, tarfile.TarError | EOFError | zlib_error)
        or "zstd" in type(e).__name__.lower()
        or type(e).__module__.startswith("zstandard")
    )


def _check_hash(
    name: str,
    src: _HashingSource,
    expected_sha256: str | None,
    expected_size: int | None,
    cause: BaseException | None = None,
) -> None:
    if expected_size is not None and src.size != expected_size:
        raise IntegrityError(name, expected=str(expected_size), actual=str(src.size), what="size") from cause
    digest = src.sha.hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise IntegrityError(name, expected=expected_sha256, actual=digest) from cause


# --------------------------------------------------------------------------- plain files


class CopyCancelled(Exception):
    """A copy stopped because another one failed (not an error of its own)."""


def copy_verified(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    expected_sha256: str,
    expected_size: int | None = None,
    display_name: str | None = None,
    mode: int = 0o644,
    stop: threading.Event | None = None,
) -> int:
    """Copy ``src`` to ``dst`` hashing every byte on the way; ``dst`` appears only if the hash matches.

    Returns the number of bytes copied. Memory stays at one buffer whatever the file size. ``stop`` (set by
    another worker that found a bad file) ends the copy at the next chunk with :class:`CopyCancelled`.
    """
    src, dst = Path(src), Path(dst)
    name = display_name or src.name
    tmp = dst.with_name(f".{dst.name}.partial")
    h = hashlib.sha256()
    size = 0
    buf = bytearray(4 * CHUNK)
    view = memoryview(buf)
    try:
        with open_regular(src) as fi, open(tmp, "wb", buffering=0) as fo:
            while n := fi.readinto(buf):
                if stop is not None and stop.is_set():
                    raise CopyCancelled(name)
                chunk = view[:n]
                h.update(chunk)
                fo.write(chunk)
                size += n
        if expected_size is not None and size != expected_size:
            raise IntegrityError(name, expected=str(expected_size), actual=str(size), what="size")
        if h.hexdigest() != expected_sha256:
            raise IntegrityError(name, expected=expected_sha256, actual=h.hexdigest())
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return size
