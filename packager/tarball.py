"""Small deterministic tar.gz writer (installer code and other small trees).

Same inputs give byte-identical output: members sorted, mtime/uid/gid 0, no owner names, gzip header
without name or time. The bytes are hashed as they are written (one pass), and the file appears at its
destination only when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LEVEL = 6  # half the time of 9 for 0.5% more bytes on the installer package


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    sha256: str
    size: int


class HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.raw.write(b)
        mv = memoryview(b)[:n] if n is not None else memoryview(b)
        self.sha.update(mv)
        self.size += len(mv)
        return len(mv)


def _norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if ti.isdir():
        ti.mode = 0o755
    elif ti.isfile():
        ti.mode = 0o755 if ti.mode & 0o111 else 0o644
    return ti


def _members(entries: list[tuple[str, Path]]) -> dict[str, Path]:
    """``{arcname: source}`` for ``entries``, directories expanded (no ``__pycache__``, no .pyc)."""
    files: dict[str, Path] = {}
    for arc, src in entries:
        if src.is_dir():
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                rel = Path(dirpath).relative_to(src)
                files[(Path(arc) / rel).as_posix().rstrip("/")] = Path(dirpath)
                for fn in filenames:
                    if not fn.endswith((".pyc", ".pyo")):
                        files[(Path(arc) / rel / fn).as_posix()] = Path(dirpath, fn)
        else:
            files[arc] = src
    return files


def inputs_key(entries: list[tuple[str, Path]], *, level: int = DEFAULT_LEVEL) -> str:
    """A sha256 over everything :func:`write_tar_gz` puts into the archive's bytes (names, modes, contents,
    level, SOURCE_DATE_EPOCH): equal keys mean byte-identical archives, so one can be reused for the other.
    """
    h = hashlib.sha256(f"tar.gz v1 level={level} epoch={os.environ.get('SOURCE_DATE_EPOCH', '0')}\n".encode())
    for arc, src in sorted(_members(entries).items()):
        st = src.lstat()
        h.update(f"{arc}\0{st.st_mode & 0o170111:o}\0".encode())
        if src.is_file() and not src.is_symlink():
            with open(src, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        elif src.is_symlink():
            h.update(os.readlink(src).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_tar_gz(dest: Path, entries: list[tuple[str, Path]], *, level: int = DEFAULT_LEVEL) -> WrittenFile:
    """Write ``entries`` ((arcname, source path) pairs; directories are added with their content)."""
    files = _members(entries)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as raw:
            hw = HashingWriter(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=hw, compresslevel=level, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for arc in sorted(files):
                        src = files[arc]
                        ti = _norm(tar.gettarinfo(str(src), arcname=arc))
                        if ti.isfile():
                            with open(src, "rb") as f:
                                tar.addfile(ti, f)
                        else:
                            tar.addfile(ti)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return WrittenFile(dest, hw.sha.hexdigest(), hw.size)
