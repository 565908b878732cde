"""Writing extracted members: files, directories and links created under the destination by worker threads."""

from __future__ import annotations

import os
import queue
import tarfile
import threading
from pathlib import Path

from installer.errors import UnsafeArchiveError
from installer.unpack.members import _parts, check_member
from installer.unpack.source import CHUNK

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


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
