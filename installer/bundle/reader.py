"""The bundle format, version 1: the one place that knows the on-disk layout.

Both sides use this module: `pack build` writes bundles through :class:`BundleWriter`, and `pack verify`
and the installer read them with :class:`Bundle`. It runs on the target's bare Python, so it uses the
standard library only (signature checks fall back to the `openssl` command when `cryptography` is absent).
See docs/bundle-format.md for the format itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from installer.errors import BundleError, IntegrityError, SignatureError
from installer.records import Manifest as ManifestRecords

FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.json.sig"
INSTALL_SH = "install.sh"
INSTALLER_ARCHIVE = "installer.tar.gz"
ENVS_DIR = "envs"
RUNTIME_DIR = "runtime"
MODELS_DIR = "models"
# split volumes (see installer/volumes.py)
VOLUME_PREFIX = "vol"
VOLUME_INDEX = "VOLUME.sha256"
SPLIT_INFO = "SPLIT.json"

ARTIFACT_KINDS = ("bootstrap", "installer", "runtime", "environment", "model")
BUFSIZE = 1 << 20


def env_artifact(name: str) -> str:
    return f"{ENVS_DIR}/{name}.tar.zst"


def runtime_artifact(name: str) -> str:
    return f"{RUNTIME_DIR}/{name}.tar.gz"


def model_dir(name: str) -> str:
    return f"{MODELS_DIR}/{name}"


def bundle_dirname(name: str, version: str) -> str:
    return f"{name}-{version}"


def canonical_json(obj: object) -> bytes:
    """The exact bytes of MANIFEST.json for ``obj`` (stable across runs and Python versions)."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def check_relpath(path: str, *, what: str = "artifact path") -> str:
    """Reject paths that could escape the bundle: absolute, '..', empty parts, backslashes."""
    p = PurePosixPath(path)
    if (not path or p.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in path.split("/"))):
        raise BundleError(f"unsafe {what} {path!r} in {MANIFEST_NAME}",
                          hint="the manifest was not produced by `pack build`; do not install this bundle")
    return path


# --------------------------------------------------------------------------- hashing


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


# --------------------------------------------------------------------------- signatures


def verify_signature(message: bytes, signature: bytes, pubkey_pem: bytes) -> bool:
    """True if ``signature`` is a valid ed25519 signature of ``message`` by ``pubkey_pem``."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        return _verify_with_openssl(message, signature, pubkey_pem)
    try:
        key = load_pem_public_key(pubkey_pem)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the public key is not an ed25519 key", hint="create keys with `pack keygen`")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _verify_with_openssl(message: bytes, signature: bytes, pubkey_pem: bytes) -> bool:
    with tempfile.TemporaryDirectory(prefix="llm-sig-") as d:
        paths = {n: Path(d, n) for n in ("msg", "sig", "key.pub")}
        paths["msg"].write_bytes(message)
        paths["sig"].write_bytes(signature)
        paths["key.pub"].write_bytes(pubkey_pem)
        r = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(paths["key.pub"]),
                            "-rawin", "-in", str(paths["msg"]), "-sigfile", str(paths["sig"])],
                           capture_output=True, check=False)
    return r.returncode == 0


def key_fingerprint(pubkey_pem: bytes) -> str:
    """Short, stable fingerprint of a PEM public key (sha256 of the DER bytes, first 16 hex)."""
    lines = [ln.strip() for ln in pubkey_pem.decode("ascii", "replace").splitlines()]
    body = "".join(ln for ln in lines if ln and not ln.startswith("-----"))
    import base64
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Artifact:
    path: str
    size: int
    sha256: str
    kind: str

    @classmethod
    def from_dict(cls, d: dict) -> Artifact:
        try:
            art = cls(path=check_relpath(str(d["path"])), size=int(d["size"]), sha256=str(d["sha256"]),
                      kind=str(d["kind"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"malformed artifact entry in {MANIFEST_NAME}: {d!r}") from e
        if len(art.sha256) != 64 or art.size < 0:
            raise BundleError(f"malformed artifact entry in {MANIFEST_NAME}: {d!r}")
        return art

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind}


@dataclass(frozen=True)
class Bundle:
    """A bundle directory opened for reading. ``manifest`` is the parsed MANIFEST.json."""

    root: Path
    manifest_bytes: bytes
    manifest: dict
    artifacts: tuple[Artifact, ...]
    records: ManifestRecords | None = field(default=None, compare=False, repr=False)  # validated, typed
    # MANIFEST.json.sig as read with the manifest (None: unsigned): what check_signature verifies and what
    # the installer keeps, so the bundle's file is never read a second time after the check
    signature: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Bundle:
        root = Path(root)
        mpath = root / MANIFEST_NAME
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (it does not exist or is not a directory)",
                              hint="pass the directory `pack build` printed, e.g. out/<name>-<version>")
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError as e:
            hint = ("this looks like split volumes: run install.sh from the first volume"
                    if (root / SPLIT_INFO).exists() else "pass the directory `pack build` printed")
            raise BundleError(f"{root}: no {MANIFEST_NAME}: not a bundle", hint=hint) from e
        # every field checked once, here (installer/records.py); the dict stays for older readers
        records = ManifestRecords.from_json(raw, source=str(mpath))
        manifest = records.raw
        arts = tuple(Artifact.from_dict(a) for a in manifest.get("artifacts", []))
        seen: set[str] = set()
        for a in arts:
            if a.path in seen or a.path in (MANIFEST_NAME, SIGNATURE_NAME):
                raise BundleError(f"{mpath}: artifact {a.path!r} listed twice or reserved")
            seen.add(a.path)
        try:
            sig: bytes | None = (root / SIGNATURE_NAME).read_bytes()
        except FileNotFoundError:
            sig = None
        return cls(root=root, manifest_bytes=raw, manifest=manifest, artifacts=arts, records=records,
                   signature=sig)

    # -- identity
    @property
    def name(self) -> str:
        return str(self.manifest["bundle"]["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["bundle"]["version"])

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    def artifact(self, path: str) -> Artifact:
        for a in self.artifacts:
            if a.path == path:
                return a
        raise BundleError(f"{self.root}: {path!r} is not listed in {MANIFEST_NAME}")

    def path_of(self, artifact: Artifact | str) -> Path:
        rel = artifact.path if isinstance(artifact, Artifact) else check_relpath(artifact)
        return self.root.joinpath(*rel.split("/"))

    def total_size(self) -> int:
        return sum(a.size for a in self.artifacts)

    # -- checks
    def unlisted_files(self) -> list[str]:
        """Files in the directory that MANIFEST.json does not list (an extra file is an error)."""
        listed = {a.path for a in self.artifacts} | {MANIFEST_NAME, SIGNATURE_NAME}
        extra: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fn in sorted(filenames):
                rel = Path(dirpath, fn).relative_to(self.root).as_posix()
                if rel not in listed:
                    extra.append(rel)
        return extra

    def check_signature(self, pubkeys: Iterable[bytes]) -> str:
        """Verify MANIFEST.json.sig against any of ``pubkeys``; returns the matching key's fingerprint."""
        sig = self.signature
        if sig is None:
            raise SignatureError(f"{self.root}: the bundle is not signed (no {SIGNATURE_NAME})",
                                 hint="build it with `pack build --key KEY`, or accept it explicitly with "
                                      "--insecure")
        keys = list(pubkeys)
        if not keys:
            raise SignatureError("no trusted public key to check the signature with",
                                 hint="pass --pubkey FILE (the .pub written by `pack keygen`)")
        for key in keys:
            if verify_signature(self.manifest_bytes, sig, key):
                return key_fingerprint(key)
        raise SignatureError(f"{self.root}: {SIGNATURE_NAME} does not match {MANIFEST_NAME} for any trusted "
                             f"key ({', '.join(key_fingerprint(k) for k in keys)})",
                             hint="the manifest was modified after signing, or it was signed by a key you "
                                  "do not trust")

    def check_files(self, *, jobs: int | None = None, rehash: bool = True,
                    on_progress: Callable[[Artifact], None] | None = None) -> None:
        """Check every artifact's presence, size and sha256; raise for the first failing one (manifest order).

        ``rehash=False`` checks only the listing and sizes: for a writer that hashed each byte as it wrote it.
        """
        extra = self.unlisted_files()
        if extra:
            raise BundleError(f"{self.root}: {len(extra)} file(s) not listed in {MANIFEST_NAME}: "
                              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}",
                              hint="something was added to the bundle after it was built; remove it or "
                                   "copy the bundle again")
        for a in self.artifacts:
            p = self.path_of(a)
            try:
                st = p.lstat()
            except FileNotFoundError as e:
                raise IntegrityError(a.path, expected=f"{a.size} bytes", actual="missing", what="file") from e
            if not p.is_file() or p.is_symlink():
                raise IntegrityError(a.path, expected="regular file", actual="not a regular file", what="type")
            if st.st_size != a.size:
                raise IntegrityError(a.path, expected=str(a.size), actual=str(st.st_size), what="size")
        if not rehash:
            return
        by_path = {os.fspath(self.path_of(a)): a for a in self.artifacts}
        bad: dict[str, str] = {}
        # biggest first keeps both cores busy to the end; failures are reported in manifest order
        for path, digest, _size in hash_files(sorted(by_path, key=lambda p: -by_path[p].size), jobs=jobs):
            a = by_path[path]
            if digest != a.sha256:
                bad[a.path] = digest
            elif on_progress:
                on_progress(a)
        for a in self.artifacts:
            if a.path in bad:
                raise IntegrityError(a.path, expected=a.sha256, actual=bad[a.path])


# --------------------------------------------------------------------------- writing


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

    def commit(self, manifest: dict, *, sign: Callable[[bytes], bytes] | None,
               verify_jobs: int | None = None, rehash: bool = False) -> Bundle:
        """Hash what is pending, write MANIFEST.json, re-open with the reader and check, sign, switch.

        ``rehash=True`` also reads again the artifacts that were hashed as they were written.
        """
        self.hash_pending(jobs=verify_jobs)
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest["artifacts"] = [a.to_dict() for a in self.artifacts]
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
