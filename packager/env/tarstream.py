"""Minimal deterministic streaming tar writer used by the env packer."""

from __future__ import annotations

import os
import tarfile

from packager.errors import EnvironmentBuildError


class TarStream:
    """Minimal streaming tar writer (PAX headers via tarfile.TarInfo) over a binary sink."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.offset = 0
        self.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        self.members = 0
        self.data_bytes = 0

    def _header(self, ti: tarfile.TarInfo) -> None:
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = self.mtime, 0, 0, "", ""
        buf = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.sink.write(buf)
        self.offset += len(buf)
        self.members += 1

    def _pad(self, size: int) -> None:
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            self.sink.write(b"\0" * pad)
        self.offset += size + pad
        self.data_bytes += size

    def add_bytes(self, name: str, data: bytes, mode: int) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, len(data), _norm_mode(mode)
        self._header(ti)
        self.sink.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, chunks, size: int, mode: int, *, what: str) -> None:
        """A regular file of exactly ``size`` bytes from an iterable of byte chunks (written as they come)."""
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, size, _norm_mode(mode)
        self._header(ti)
        written = 0
        for chunk in chunks:
            if written + len(chunk) > size:
                raise EnvironmentBuildError(f"{what} grew while it was being packed",
                                            hint="do not modify the environment while packing it")
            self.sink.write(chunk)
            written += len(chunk)
        if written != size:
            raise EnvironmentBuildError(f"{what} shrank while it was being packed",
                                        hint="do not modify the environment while packing it")
        self._pad(size)

    def add_symlink(self, name: str, target: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
        self._header(ti)

    def add_dir(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        self._header(ti)

    def add_file(self, name: str, path: str, size: int, mode: int, buf: bytearray, watch=None) -> None:
        """Stream ``path`` (``size`` bytes per lstat) into the archive; ``watch(chunk_view)`` sees each chunk."""
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, size, _norm_mode(mode)
        self._header(ti)
        view = memoryview(buf)
        left = size
        with open(path, "rb", buffering=0) as f:
            while left:
                n = f.readinto(view[:min(left, len(buf))])
                if not n:
                    raise EnvironmentBuildError(f"{path} shrank while it was being packed",
                                                hint="do not modify the environment while packing it")
                chunk = view[:n]
                self.sink.write(chunk)
                if watch is not None:
                    watch(chunk)
                left -= n
        self._pad(size)

    def close(self) -> None:
        self.sink.write(b"\0" * (tarfile.BLOCKSIZE * 2))
        self.offset += tarfile.BLOCKSIZE * 2
        rem = self.offset % tarfile.RECORDSIZE
        if rem:
            self.sink.write(b"\0" * (tarfile.RECORDSIZE - rem))


def _norm_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644
