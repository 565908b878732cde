"""Streaming hash and copy helpers for the build host.

Every function reads a file once, in fixed-size chunks, so memory stays flat whatever the model size.
``hashlib.sha256`` (OpenSSL) releases the GIL on large buffers, but a process pool measured faster than
threads on this kind of work, so :func:`hash_files_parallel` (:func:`iter_hash_files`) and
:func:`copy_and_hash_parallel` use processes once there is enough data to amortise starting them.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from installer.bundle import sha256_file  # one implementation, shared with the target

BUFSIZE = 1 << 20
# Below this many bytes in total, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 64 << 20


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


def process_pool(jobs: int) -> ProcessPoolExecutor:
    # fork, not forkserver/spawn: those re-import the caller's __main__ in every worker, which re-runs
    # any script without a `if __name__ == "__main__"` guard. Workers only read, hash and write files.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)


def total_size(paths: Iterable[Path]) -> int:
    return sum(_size_or_zero(p) for p in paths)


def iter_hash_files(paths: Sequence[str | os.PathLike[str]], jobs: int) -> Iterator[tuple[Path, str, int]]:
    """Hash many files with ``jobs`` worker processes; yield ``(path, sha256 hex, size)`` as each finishes.

    Files are started biggest first, so the workers stay busy to the end. Memory stays flat: each worker
    streams its file. Small batches are hashed in-process. The first error (``OSError``: a file gone or
    unreadable) is raised as it comes, and files not yet started are dropped.
    """
    ps = sorted((Path(p) for p in paths), key=lambda p: -_size_or_zero(p))
    if jobs <= 1 or len(ps) <= 1 or total_size(ps) < PARALLEL_MIN_BYTES:
        for p in ps:
            yield (p, *sha256_file(p))
        return
    pool = process_pool(min(jobs, len(ps)))
    try:
        futures = {pool.submit(sha256_file, p): p for p in ps}
        for fut in as_completed(futures):
            yield (futures[fut], *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def hash_files_parallel(paths: Sequence[str | os.PathLike[str]], jobs: int) -> dict[Path, tuple[str, int]]:
    """Hash many files with ``jobs`` worker processes; return ``{path: (sha256 hex, size)}``."""
    return {p: (sha, size) for p, sha, size in iter_hash_files(paths, jobs)}


def _size_or_zero(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _copy_pair(pair: tuple[Path, Path]) -> tuple[str, int]:
    return copy_and_hash(pair[0], pair[1])


def copy_and_hash_parallel(pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
                           jobs: int) -> list[tuple[str, int]]:
    """Run :func:`copy_and_hash` over ``(src, dst)`` pairs with ``jobs`` processes, results in order."""
    ps = [(Path(s), Path(d)) for s, d in pairs]
    if jobs <= 1 or len(ps) <= 1 or total_size(s for s, _ in ps) < PARALLEL_MIN_BYTES:
        return [_copy_pair(p) for p in ps]
    with process_pool(min(jobs, len(ps))) as pool:
        return list(pool.map(_copy_pair, ps))
