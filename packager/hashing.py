"""Streaming hash and copy helpers for the build host.

Every function reads a file once, in fixed-size chunks, so memory stays flat whatever the model size.
Hashing many files in parallel is :func:`installer.bundle.hash_files` (threads: OpenSSL's sha256 releases
the GIL), shared with `pack verify` and the installer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from installer.bundle import hash_files, sha256_file  # one implementation, shared with the target

__all__ = ["copy_and_hash", "git_blob_sha1_and_sha256", "hash_files", "sha256_file"]

BUFSIZE = 1 << 20


def _read_chunks(f, bufsize: int):
    # f.read() into a fresh bytes object each time, not f.readinto() one long-lived 1 MiB bytearray. In a
    # fresh process glibc serves that bytearray from its own mmap() region (the mmap threshold starts at
    # 128 KiB), and on the build VM copying the page cache into such a region at times cost 3-5x the kernel
    # time of copying into heap memory (2 hashing processes, 2.2 GB: 0.6 s vs 0.2 s of sys time, ~20% of
    # the hash; not reproducible at other times). read() frees each chunk, which raises glibc's threshold,
    # so from the second chunk on it is heap memory; it was never slower.
    while chunk := f.read(bufsize):
        yield chunk


def git_blob_sha1_and_sha256(path: str | os.PathLike[str], bufsize: int = BUFSIZE) -> tuple[str, str, int]:
    """Return ``(git blob sha1, sha256, size)`` in one pass (the hub lists git oids for non-LFS files)."""
    size = os.stat(path).st_size
    g = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        for chunk in _read_chunks(f, bufsize):
            g.update(chunk)
            h.update(chunk)
            n += len(chunk)
    if n != size:  # the file changed while we read it
        raise OSError(f"{path}: size changed while hashing ({size} -> {n} bytes)")
    return g.hexdigest(), h.hexdigest(), n


def copy_and_hash(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                  bufsize: int = BUFSIZE) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` and hash the bytes in the same pass; return ``(sha256 hex, size)``.

    Writes ``dst.tmp`` first and renames it over ``dst`` only when the copy is complete, so a crash
    never leaves a truncated ``dst``.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            for chunk in _read_chunks(fin, bufsize):
                h.update(chunk)
                size += len(chunk)
                # an unbuffered write may be short; loop until the chunk is out
                view = memoryview(chunk)
                while view:
                    view = view[fout.write(view):]
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return h.hexdigest(), size
