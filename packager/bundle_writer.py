"""Writing a bundle on the build host: :class:`BundleWriter` (staging dir, hashing, signing, atomic switch).

Build-only: it does not ship in installer.tar.gz. What it writes is read back with the installer's own
reader (:class:`installer.bundle.reader.Bundle`) before it is signed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from installer.bundle.hashing import hash_files
from installer.bundle.names import (
    ARTIFACT_KINDS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROVIDED,
    SIGNATURE_NAME,
    bundle_dirname,
)
from installer.bundle.reader import Artifact, Bundle, canonical_json, check_relpath
from installer.errors import IntegrityError


class BundleWriter:
    """Assemble a bundle in a staging directory beside its final place, then switch atomically.

    Usage: ``w = BundleWriter(out_dir, name, version)``; put files at ``w.path(rel)`` and ``w.record`` them
    (or ``w.add_bytes``); ``w.commit(manifest_without_artifacts, sign=callable)``. Until ``commit`` nothing
    is visible at the final path, and :meth:`abort` (or an exception inside ``with``) removes the staging
    directory.

    What is signed is what was read: an artifact recorded with ``hashed=True`` had every byte hashed by
    the pass that wrote it into the staging directory (``add_bytes``, a fresh archive, a verified copy);
    every other one (a hardlink or reflink from a cache, whose bytes nobody read) is read again by
    :meth:`hash_pending` (one threaded pass, also run by ``commit``) and must match the sha256 it was
    recorded with; ``sha256=None`` takes what is read (a local model hashed only once, here). After
    signing, the files that were hashed here must still have the stat they had when hashed: a file
    edited in place through a shared inode meanwhile is refused, naming it.

    The switch is one atomic step: ``renameat2(RENAME_EXCHANGE)`` swaps the staging directory with the
    previous bundle, so the final path always holds a complete bundle (the old one or the new one);
    filesystems without it (vfat, some network filesystems) fall back to two renames. Leftovers of a
    crashed earlier writer of the same bundle (staging and ``.old-PID`` directories whose process is
    gone) are removed when a writer starts, after putting a previous bundle that a crash left only
    under ``.old-PID`` back at the final path.
    """

    def __init__(self, out_dir: str | os.PathLike[str], name: str, version: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.final = self.out_dir / bundle_dirname(name, version)
        self.recovered = clean_writer_leftovers(self.final)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.{os.getpid()}-", suffix=".partial",
                                             dir=self.out_dir))
        self._artifacts: dict[str, Artifact] = {}
        self._pending: dict[str, tuple[str | None, str | None]] = {}  # relpath -> (source, hint)
        self._hashed_stat: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def path(self, relpath: str) -> Path:
        """Where an artifact goes inside the staging directory (parents created)."""
        p = self.staging.joinpath(*check_relpath(relpath).split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def record(self, relpath: str, *, kind: str, sha256: str | None, size: int | None = None,
               hashed: bool = False, source: str | os.PathLike[str] | None = None,
               hint: str | None = None) -> Artifact | None:
        """Record an artifact already at ``self.path(relpath)``.

        ``hashed=True``: ``sha256`` and ``size`` were computed over exactly the bytes written there.
        Otherwise the file is read again before signing (:meth:`hash_pending`) and must match ``sha256``
        (``None``: take what is read); ``source`` (where it came from, e.g. a store blob) and ``hint`` go
        into the error if it does not. Returns the artifact, or None while it is still pending.
        """
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        check_relpath(relpath)
        if hashed:
            if sha256 is None or size is None:
                raise ValueError("hashed=True needs the sha256 and size of the bytes written")
            self._pending.pop(relpath, None)
            art = Artifact(path=relpath, size=size, sha256=sha256, kind=kind)
            self._artifacts[relpath] = art
            return art
        self._artifacts[relpath] = Artifact(path=relpath, size=-1 if size is None else size,
                                            sha256=sha256 or "", kind=kind)
        self._pending[relpath] = (None if source is None else os.fspath(source), hint)
        return None

    def add_bytes(self, relpath: str, data: bytes, *, kind: str, mode: int = 0o644) -> Artifact:
        p = self.path(relpath)
        p.write_bytes(data)
        os.chmod(p, mode)
        art = self.record(relpath, kind=kind, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                          hashed=True)
        assert art is not None
        return art

    def pending_count(self) -> int:
        return len(self._pending)

    def pending_size(self) -> int:
        """Bytes :meth:`hash_pending` will read (for a progress bar)."""
        total = 0
        for rel in self._pending:
            try:
                total += os.lstat(self.staging.joinpath(*rel.split("/"))).st_size
            except OSError:
                pass
        return total

    def hash_pending(self, *, jobs: int | None = None,
                     on_bytes: Callable[[int], None] | None = None) -> dict[str, Artifact]:
        """Read every artifact not hashed as it was written, in one threaded pass; ``{relpath: artifact}``.

        Raises :class:`IntegrityError` naming the artifact (and its source) whose bytes are not the
        sha256 or size it was recorded with, or that changed while it was read.
        """
        if not self._pending:
            return {}
        by_path = {os.fspath(self.staging.joinpath(*rel.split("/"))): rel for rel in self._pending}
        before: dict[str, tuple[int, ...]] = {}
        for p, rel in by_path.items():
            try:
                st = os.lstat(p)
            except FileNotFoundError as e:
                raise IntegrityError(rel, expected="a file", actual="missing", what="file") from e
            if not os.path.isfile(p) or os.path.islink(p):
                raise IntegrityError(rel, expected="regular file", actual="not a regular file", what="type")
            before[p] = _stat_id(st)
        order = sorted(by_path, key=lambda p: -before[p][1])  # biggest first keeps every core busy
        done: dict[str, Artifact] = {}
        for p, digest, size in hash_files(order, jobs=jobs, on_bytes=on_bytes):
            rel = by_path[p]
            art = self._artifacts[rel]
            source, hint = self._pending[rel]
            name = rel if source is None else f"{rel} (from {source})"
            hint = hint or "the file changed after it was hashed (or the disk is failing); build again"
            now = _stat_id(os.lstat(p))
            err = None
            if now != before[p] or size != before[p][1]:
                err = IntegrityError(name, expected="unchanged while it was read", actual="modified",
                                     what="content", hint=hint)
            elif art.size >= 0 and size != art.size:
                err = IntegrityError(name, expected=f"{art.size} bytes", actual=f"{size} bytes", what="size",
                                     hint=hint)
            elif art.sha256 and digest != art.sha256:
                err = IntegrityError(name, expected=art.sha256, actual=digest, hint=hint)
            if err is not None:
                err.artifact = rel  # type: ignore[attr-defined]  # for the caller's clean-up (store blob...)
                raise err
            done[rel] = Artifact(path=rel, size=size, sha256=digest, kind=art.kind)
            self._hashed_stat[p] = now
        for rel, art in done.items():
            self._artifacts[rel] = art
            del self._pending[rel]
        return done

    @property
    def artifacts(self) -> list[Artifact]:
        return sorted(self._artifacts.values(), key=lambda a: a.path)

    def leave_out(self, provided: Callable[[Artifact], bool], *, known_only: bool = False) -> list[Artifact]:
        """A delta bundle: remove from the staging directory every artifact ``provided`` says the target has
        (by kind and sha256), keeping its entry with ``provided: "target"``. ``known_only``: only those whose
        sha256 is already known (a pending artifact recorded with its sha256 is then never read)."""
        out = []
        for rel, a in list(self._artifacts.items()):
            if a.provided is not None or not a.sha256 or a.size < 0:
                continue
            if known_only is False and rel in self._pending:
                continue
            if not provided(a):
                continue
            p = self.staging.joinpath(*rel.split("/"))
            p.unlink(missing_ok=True)
            self._pending.pop(rel, None)
            self._hashed_stat.pop(os.fspath(p), None)
            self._artifacts[rel] = dataclasses.replace(a, provided=PROVIDED)
            out.append(self._artifacts[rel])
        _prune_empty_dirs(self.staging)
        return out

    def commit(self, manifest: dict, *, sign: Callable[[bytes], bytes] | None,
               verify_jobs: int | None = None, rehash: bool = False,
               provided: Callable[[Artifact], bool] | None = None, delta: dict | None = None) -> Bundle:
        """Hash what is pending, write MANIFEST.json, re-open with the reader and check, sign, switch.

        ``rehash=True`` also reads again the artifacts that were hashed as they were written. ``provided``
        (a delta bundle): the artifacts it accepts are left out (:meth:`leave_out`) and MANIFEST.json gets
        ``delta`` when at least one was.
        """
        if provided is not None:
            self.leave_out(provided, known_only=True)  # a cached env archive the target has is never read
        self.hash_pending(jobs=verify_jobs)
        if provided is not None:
            self.leave_out(provided)
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest["artifacts"] = [a.to_dict() for a in self.artifacts]
        if delta is not None and any(a.provided for a in self.artifacts):
            manifest["delta"] = delta
        data = canonical_json(manifest)
        (self.staging / MANIFEST_NAME).write_bytes(data)
        # Re-open with the installer's own reader before signing (a bundle we cannot read is never signed).
        # Every artifact's bytes were read once, as written or by hash_pending, so the reader checks the
        # listing and sizes here (`pack verify` does the full check).
        bundle = Bundle.load(self.staging)
        bundle.check_files(jobs=verify_jobs, rehash=rehash)
        if sign is not None:
            (self.staging / SIGNATURE_NAME).write_bytes(sign(data))
        for p, st in self._hashed_stat.items():  # a shared inode edited in place since it was hashed
            if _stat_id(os.lstat(p)) != st:
                rel = Path(p).relative_to(self.staging).as_posix()
                err = IntegrityError(rel, expected="unchanged since it was hashed", actual="modified",
                                     what="content", hint="the source file was modified during the build "
                                     "(a hardlinked file shares its bytes); build again")
                err.artifact = rel  # type: ignore[attr-defined]
                raise err
        os.chmod(self.staging, 0o755)
        self._switch()
        return Bundle.load(self.final)

    def _switch(self) -> None:
        if _exchange(self.staging, self.final):  # one step: the final path never lacks a bundle
            _remove(self.staging)  # now the previous bundle
            return
        old = None
        if self.final.exists() or self.final.is_symlink():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        try:
            os.replace(self.staging, self.final)
        except BaseException:  # OSError, or Ctrl-C between the two renames: put the previous one back
            if old is not None:
                os.replace(old, self.final)
            raise
        if old is not None:
            _remove(old)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _prune_empty_dirs(top: Path) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
        if Path(dirpath) != top:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _stat_id(st: os.stat_result) -> tuple[int, ...]:
    # no ctime: another build hardlinking the same store blob changes it; an edit in place changes mtime
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(src: Path, dst: Path) -> bool:
    """Atomically swap two existing paths with renameat2(RENAME_EXCHANGE); False if that cannot be done here.

    False (and nothing changed) when ``dst`` does not exist (then a plain rename is atomic anyway), or
    when the C library or the filesystem lacks it (ENOSYS, EINVAL). Other errors are raised.
    """
    if not dst.exists() or dst.is_symlink():
        return False
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_writer_leftovers(final: Path) -> Path | None:
    """Tidy after a writer of ``final`` that crashed (its process is gone); the bundle put back, if any.

    A crash between the two renames of the fallback switch leaves the previous bundle only at
    ``.<name>.old-PID``: it goes back to the final path. Staging directories (``.<name>.PID-*.partial``)
    and other ``.old-PID`` copies of dead writers are removed. Directories of live writers are left alone.
    """
    out, name = final.parent, final.name
    pat = re.compile(rf"\.{re.escape(name)}\.(?:(\d+)-[A-Za-z0-9_]+\.partial|old-(\d+))")
    recovered = None
    try:
        entries = sorted(os.listdir(out))
    except FileNotFoundError:
        return None
    for entry in entries:
        m = pat.fullmatch(entry)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        path = out / entry
        if m.group(2) and not final.exists() and not final.is_symlink() and (path / MANIFEST_NAME).is_file():
            os.replace(path, final)
            recovered = final
            continue
        _remove(path)
    return recovered
