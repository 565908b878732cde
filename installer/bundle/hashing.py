"""sha256 of bundle files: one streaming pass per file, many files on threads (build host and target)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator

from installer.bundle.names import BUFSIZE


def sha256_file(path: str | os.PathLike[str], bufsize: int = BUFSIZE, *,
                on_bytes: Callable[[int], None] | None = None,
                stop: threading.Event | None = None) -> tuple[str, int]:
    """Stream ``path`` through sha256; returns (hexdigest, size). Memory stays at one buffer.

    ``read()`` into a fresh bytes object each time, not ``readinto()`` one long-lived 1 MiB bytearray: glibc
    serves a fresh bytearray from its own mmap() region, and copying the page cache into it measured 3-5x
    the kernel time of copying into heap memory (~20% of a whole 2-way hash). ``on_bytes`` is called with
    each chunk's length (progress bars); a set ``stop`` ends the read early with :class:`HashCancelled`.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
            size += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
            if stop is not None and stop.is_set():
                raise HashCancelled(os.fspath(path))
    return h.hexdigest(), size


class HashCancelled(Exception):
    """A parallel hash was abandoned (an earlier error or the caller stopped reading results)."""


def hash_files(paths: Iterable[str | os.PathLike[str]], *, jobs: int | None = None, ordered: bool = True,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, str, int]]:
    """Hash files on ``jobs`` threads (default: one per core); yield ``(path, sha256, size)``.

    Threads, not processes: OpenSSL's sha256 and ``read()`` release the GIL on every 1 MiB chunk, so N
    threads hash on N cores (measured: 2 threads over 2.2 GB 0.88-0.94 s vs 0.95 s for 2 fresh processes,
    which also cost a fork each and cannot report progress per chunk). Files start in the order given
    (pass biggest first to keep every core busy to the end); results come in that order, or as each
    finishes with ``ordered=False``. The first error is raised as it comes; files not yet started are
    dropped and running ones stop at their next chunk.
    """
    items = [os.fspath(p) for p in paths]
    jobs = min(jobs or os.cpu_count() or 1, len(items))
    if jobs <= 1:
        for p in items:
            yield (p, *sha256_file(p, on_bytes=on_bytes))
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sha256")
    try:
        futures = {pool.submit(sha256_file, p, on_bytes=on_bytes, stop=stop): p for p in items}
        for fut in (futures if ordered else as_completed(futures)):
            yield (futures[fut], *fut.result())
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
