"""Copying a bundle file to its place on the target, hashing every byte on the way (the one copy-and-hash loop)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from installer.errors import IntegrityError
from installer.unpack.source import CHUNK, Source, open_source, source_name


class CopyCancelled(Exception):
    """A copy stopped because another one failed (not an error of its own)."""


def copy_verified(
    src: Source,
    dst: str | os.PathLike[str],
    *,
    expected_sha256: str,
    expected_size: int | None = None,
    display_name: str | None = None,
    mode: int = 0o644,
    stop: threading.Event | None = None,
) -> int:
    """Copy ``src`` to ``dst`` hashing every byte on the way; ``dst`` appears only if the hash matches.

    ``src`` is a bundle file or an artifact's pieces on split volumes. Returns the number of bytes copied.
    Memory stays at one buffer whatever the file size. ``stop`` (set by another worker that found a bad
    file) ends the copy at the next chunk with :class:`CopyCancelled`.
    """
    dst = Path(dst)
    name = display_name or source_name(src)
    tmp = dst.with_name(f".{dst.name}.partial")
    h = hashlib.sha256()
    size = 0
    buf = bytearray(4 * CHUNK)
    view = memoryview(buf)
    try:
        with open_source(src) as fi, open(tmp, "wb", buffering=0) as fo:
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
