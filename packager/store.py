"""The build host's content store: sha256-addressed blobs that later builds reuse, and placing files.

Layout under the root (default ``~/.cache/llm-pack/store``, or ``$LLM_PACK_STORE``)::

    sha256/ab/<hex>          one verified blob per distinct content, read-only
    alias/<kind>/ab/<key>    small text files mapping another id (a git blob sha1, a local file's stat) to a sha256
    tmp/                     scratch space on the same filesystem (partial downloads, copies)

A blob only ever appears under ``sha256/`` after its bytes were hashed and matched, and it is
written by rename, so a crash leaves either nothing or a complete, correct blob. Only downloads
(hub sources) become blobs: a model from a local directory is hashed in place and never copied in,
so the store is never polluted by (or made to trust) the operator's files.

:func:`place_file` puts a file into a bundle without copying its bytes where it can: a hardlink
(same filesystem), else a reflink (``FICLONE``, CoW filesystems), else a copy that re-hashes every
byte against the expected sha256. Its source is a store blob (hub models) or the operator's own file
(local models). A hardlink or reflink reads no byte, so the build reads every such file once more, in
the bundle, before it signs (``packager.bundle_writer.BundleWriter.hash_pending``): a blob that rotted in the
store, or a local file edited in place behind the stat cache, is refused by name (a damaged blob is
removed from the store, so the next build fetches it again). Why hardlinking the operator's file is
safe: the bundle file then shares its inode, so if the operator later edits that file *in place*, the
bundle file changes too. That is never silent: the build refuses a file whose stat changed between its
hash and the signature, and after the build ``pack verify`` and ``install.sh`` check every file's sha256
against the signed MANIFEST.json and name the file that no longer matches. (Writing in place, e.g.
``cp new old`` onto the existing file, changes both; a tool that writes a new file and renames it over
the old one leaves the bundle untouched.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import uuid
from pathlib import Path

from installer.errors import IntegrityError, UsageError
from packager.errors import NotFoundError
from packager.hashing import copy_and_hash, sha256_file

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"[0-9A-Za-z._-]{1,128}")
CORRUPT_HINT = "the content store is corrupt; delete this blob and build again"


def default_store_root() -> Path:
    env = os.environ.get("LLM_PACK_STORE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm-pack" / "store"


class ContentStore:
    """sha256-addressed blobs under ``root/sha256/ab/<hex>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    @classmethod
    def default(cls) -> ContentStore:
        return cls(default_store_root())

    def __repr__(self) -> str:
        return f"ContentStore({str(self.root)!r})"

    # -- lookup -------------------------------------------------------------------------------------
    def blob(self, sha256: str) -> Path:
        if not _HEX64.fullmatch(sha256):
            raise UsageError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return bool(sha256) and _HEX64.fullmatch(sha256) is not None and self.blob(sha256).is_file()

    def tmpdir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def verify(self, sha256: str) -> bool:
        """Re-hash a blob (e.g. after a disk scare); False if it is missing or its bytes changed."""
        if not self.has(sha256):
            return False
        return sha256_file(self.blob(sha256))[0] == sha256

    # -- aliases: other content ids (git blob sha1) that map to a sha256 -----------------------------
    def _alias_path(self, kind: str, key: str) -> Path:
        if not _KEY.fullmatch(kind) or not _KEY.fullmatch(key):
            raise UsageError(f"bad alias {kind!r}/{key!r}")
        return self.root / "alias" / kind / key[:2] / key

    def record_alias(self, kind: str, key: str, sha256: str) -> None:
        """Remember that content known as ``kind:key`` (e.g. ``git-sha1:<oid>``) is blob ``sha256``."""
        self.blob(sha256)  # validates
        path = self._alias_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(sha256 + "\n")
        os.replace(tmp, path)

    def lookup_alias(self, kind: str, key: str, *, require_blob: bool = True) -> str | None:
        """The sha256 recorded for ``kind:key``, or None.

        ``require_blob``: also None when that blob is not in the store (the default; ``False`` for
        aliases of content that lives elsewhere, like a local model file hashed in place).
        """
        try:
            sha = self._alias_path(kind, key).read_text().strip()
        except (OSError, UsageError):
            return None
        if not _HEX64.fullmatch(sha):
            return None
        return sha if not require_blob or self.has(sha) else None

    # -- adding -------------------------------------------------------------------------------------
    def add_file(self, src: Path, *, expected_sha256: str | None, expected_size: int | None, name: str,
                 move: bool, hint: str | None = None) -> Path:
        """Put ``src`` into the store after checking its size and sha256; return the blob path.

        ``move=False`` copies and hashes in one pass. ``move=True`` hashes ``src`` and then renames it
        into place (``src`` must be on the store's filesystem for that to be free; otherwise it is
        copied). On a mismatch :class:`IntegrityError` names ``name`` and ``src`` is left untouched.
        """
        src = Path(src)
        if move:
            sha, size = sha256_file(src)
            _check(name, expected_sha256, expected_size, sha, size, hint)
            blob = self.blob(sha)
            if blob.is_file():
                src.unlink()
                return blob
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(src, 0o444)
            try:
                os.replace(src, blob)
                return blob
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
            # another filesystem: fall through to a verified copy, then drop the source
            blob = self._copy_in(src, name, sha, size, hint)
            src.unlink()
            return blob
        return self._copy_in(src, name, expected_sha256, expected_size, hint)

    def _copy_in(self, src: Path, name: str, expected_sha256: str | None, expected_size: int | None,
                 hint: str | None) -> Path:
        tmp = self.tmpdir() / f"add-{uuid.uuid4().hex}"
        try:
            if _reflink(src, tmp):  # same CoW filesystem: no bytes copied, one read to hash the clone
                sha, size = sha256_file(tmp)
            else:
                sha, size = copy_and_hash(src, tmp)
            _check(name, expected_sha256, expected_size, sha, size, hint)
            blob = self.blob(sha)
            if not blob.is_file():
                blob.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, blob)
            return blob
        finally:
            tmp.unlink(missing_ok=True)

    # -- placing blobs into a bundle -----------------------------------------------------------------
    def link_into(self, sha256: str, dest: Path) -> str:
        """:func:`place_file` for a blob of this store; ``"hardlink"``, ``"reflink"`` or ``"copy"``."""
        return self.place_blob(sha256, dest)[0]

    def place_blob(self, sha256: str, dest: Path) -> tuple[str, str | None, int | None]:
        """:func:`place` for a blob of this store (a copy is checked against ``sha256``)."""
        blob = self.blob(sha256)
        if not blob.is_file():
            raise NotFoundError(f"blob {sha256} is not in the content store {self.root}",
                                hint="fetch the model again (`pack build` does this)")
        return place(blob, dest, sha256, hint=CORRUPT_HINT)

    def discard(self, sha256: str) -> bool:
        """Remove a blob found damaged (its bytes are not its name), so the next build fetches it again."""
        blob = self.blob(sha256)
        try:
            blob.unlink()
        except FileNotFoundError:
            return False
        return True

    def drop_alias(self, kind: str, key: str) -> None:
        """Forget ``kind:key`` (a stat cache entry that no longer describes the file's bytes)."""
        try:
            self._alias_path(kind, key).unlink()
        except (FileNotFoundError, UsageError):
            pass


def place_file(src: Path, dest: Path, sha256: str, *, hint: str | None = None) -> str:
    """Make ``dest`` a real file with ``src``'s bytes (which must hash to ``sha256``), copying none if it can.

    Tries a hardlink, then a reflink (``FICLONE``), then a copy that hashes the bytes as it writes them
    and raises :class:`IntegrityError` naming ``src`` if they do not match ``sha256`` (``dest`` is then
    left as it was). Returns ``"hardlink"``, ``"reflink"`` or ``"copy"``. ``dest`` is replaced
    atomically (temp file + rename in its directory). A hardlinked ``dest`` shares the inode with
    ``src``: never write into it afterwards (see the module docstring for why that is still safe).
    """
    return place(src, dest, sha256, hint=hint)[0]


def place(src: Path, dest: Path, sha256: str | None, *, hint: str | None = None
          ) -> tuple[str, str | None, int | None]:
    """:func:`place_file`, returning ``(how, sha256, size)`` of the bytes written for a copy.

    For a hardlink or reflink nothing was read: ``(how, None, None)``, and the caller must hash ``dest``
    before trusting it (``BundleWriter.record(..., hashed=False)`` does). ``sha256=None`` checks nothing
    for a copy (its hash is returned).
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise NotFoundError(f"{src} is gone (or not a regular file); it was there when the build started",
                            hint="build again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)  # EXDEV across filesystems, EPERM under fs.protected_hardlinks, EMLINK ...
            os.replace(tmp, dest)
            return "hardlink", None, None
        except OSError:
            tmp.unlink(missing_ok=True)
        if _reflink(src, tmp):
            os.replace(tmp, dest)
            return "reflink", None, None
        sha, size = copy_and_hash(src, tmp)
        if sha256 is not None and sha != sha256:
            raise IntegrityError(str(src), expected=sha256, actual=sha,
                                 hint=hint or "the file changed after it was hashed (or the disk is failing); "
                                              "build again")
        os.replace(tmp, dest)
        return "copy", sha, size
    finally:
        tmp.unlink(missing_ok=True)


def _reflink(src: Path, dst: Path) -> bool:
    """Clone ``src`` to a new ``dst`` with FICLONE (btrfs, xfs, ...); False (and no ``dst``) if unsupported."""
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


def _check(name: str, expected_sha256: str | None, expected_size: int | None, sha: str, size: int,
           hint: str | None) -> None:
    if expected_size is not None and size != expected_size:
        raise IntegrityError(name, expected=f"{expected_size} bytes", actual=f"{size} bytes", what="size",
                             hint=hint)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise IntegrityError(name, expected=expected_sha256, actual=sha, hint=hint)
