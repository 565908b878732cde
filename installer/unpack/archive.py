"""Verify and extract bundle artifacts in one pass over their bytes.

An environment archive (``envs/<env>.tar.zst``) is read once: the raw bytes go through sha256 (the
artifact's hash in MANIFEST.json) and zstandard, and the decompressed stream straight into
:mod:`tarfile` in stream mode (``"r|"``) with the ``data`` filter (PEP 706) plus our own, stricter member
checks (no absolute paths, no ``..``, no links leaving the destination, no device nodes or fifos, no
setuid/setgid bits). Files are written by worker threads (what an environment's extraction is bound by); a reader thread
that overlaps reading with extraction is a bench experiment (bench/threaded_reader.py, ``read_ahead=``).

The hash is only known at the end of the stream, so extraction goes into a directory the caller will
rename only after success: on any failure (unsafe member, hash or size mismatch, corrupt stream) the
destination directory is removed before the error is raised.

Model files are copied with :func:`copy_verified` (hash while copying, temp name, rename).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from zlib import error as zlib_error

from installer.errors import BundleError, IntegrityError
from installer.unpack.pieces import Pieces
from installer.unpack.source import (
    CHUNK,
    Source,
    _decompressed_chunks,
    _HashingSource,
    _Plain,
    compression_of,
    source_name,
)
from installer.unpack.writer import DEFAULT_WORKERS, _Writer


@dataclass(frozen=True)
class ExtractResult:
    sha256: str  # of the archive as read (compressed bytes)
    size: int  # archive bytes read
    members: int
    bytes_out: int  # decompressed bytes of regular files written
    seconds: float


def extract_archive(
    archive: Source,
    dest: str | os.PathLike[str],
    *,
    expected_sha256: str | None,
    expected_size: int | None = None,
    compression: str | None = None,
    display_name: str | None = None,
    workers: int | None = None,
    read_ahead: Callable[[Callable[[], bytes]], _Plain] | None = None,
) -> ExtractResult:
    """Extract ``archive`` into ``dest`` (created; must be new or empty), verifying its sha256 on the way.

    On any failure ``dest`` is removed and the error raised: :class:`UnsafeArchiveError` for a refused member,
    :class:`IntegrityError` for a size/hash mismatch (also when the stream is corrupt and the hash says so),
    :class:`BundleError` for an unreadable archive whose hash matches.
    """
    archive = archive if isinstance(archive, Pieces) else Path(archive)
    dest = Path(dest)
    name = display_name or source_name(archive)
    compression = compression or compression_of(archive)
    t0 = time.perf_counter()
    if expected_size is not None:  # pieces: each piece's size is checked as it is opened
        actual = archive.size if isinstance(archive, Pieces) else archive.stat().st_size
        if actual != expected_size:
            raise IntegrityError(name, expected=str(expected_size), actual=str(actual), what="size")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"{dest}: extraction target is not empty")
    src = _HashingSource(archive)
    reader: _Plain | None = None
    members = 0
    bytes_out = 0
    try:
        produce = _decompressed_chunks(src, compression)
        fileobj = reader = read_ahead(produce) if read_ahead else _Plain(produce)
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
