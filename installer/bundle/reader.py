"""The bundle format, version 1: reading a bundle (:class:`Bundle`, :class:`Artifact`).

`pack verify` and the installer read bundles with :class:`Bundle`; `pack build` writes them with
``packager.bundle_writer.BundleWriter``, which re-opens what it wrote with this reader. It runs on the
target's bare Python: standard library only. See docs/bundle-format.md for the format itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from installer.bundle.hashing import hash_files
from installer.bundle.manifest import Manifest as ManifestRecords
from installer.bundle.names import MANIFEST_NAME, SIGNATURE_NAME, SPLIT_INFO
from installer.bundle.signature import key_fingerprint, verify_signature
from installer.errors import BundleError, IntegrityError, SignatureError

if TYPE_CHECKING:
    from installer.bundle.volumes import Volumes


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


@dataclass(frozen=True, slots=True)
class Artifact:
    path: str
    size: int
    sha256: str
    kind: str
    # "target": a delta bundle leaves this file out; the target has it (an installed copy with this sha256)
    provided: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Artifact:
        try:
            art = cls(path=check_relpath(str(d["path"])), size=int(d["size"]), sha256=str(d["sha256"]),
                      kind=str(d["kind"]), provided=None if d.get("provided") is None else str(d["provided"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"malformed artifact entry in {MANIFEST_NAME}: {d!r}") from e
        if len(art.sha256) != 64 or art.size < 0:
            raise BundleError(f"malformed artifact entry in {MANIFEST_NAME}: {d!r}")
        return art

    def to_dict(self) -> dict:
        out = {"path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind}
        if self.provided is not None:
            out["provided"] = self.provided
        return out


@dataclass(frozen=True)
class Bundle:
    """A bundle directory opened for reading. ``manifest`` is the parsed MANIFEST.json.

    ``artifacts`` are the files in the bundle; ``provided`` the ones a delta bundle leaves to the target
    (listed in MANIFEST.json with ``"provided": "target"``, not in the directory: docs/delta.md)."""

    root: Path
    manifest_bytes: bytes
    manifest: dict
    artifacts: tuple[Artifact, ...]
    records: ManifestRecords | None = field(default=None, compare=False, repr=False)  # validated, typed
    # MANIFEST.json.sig as read with the manifest (None: unsigned): what check_signature verifies and what
    # the installer keeps, so the bundle's file is never read a second time after the check
    signature: bytes | None = field(default=None, compare=False, repr=False)
    # split volumes (root is volume 1): the artifacts are read in place from their pieces, never joined
    volumes: Volumes | None = field(default=None, compare=False, repr=False)
    # per-host service overrides (installer/bundle/overrides.py) already merged into manifest/records; part of
    # the installed version's id, never of the signed bytes
    overrides: dict | None = field(default=None, compare=False, repr=False)
    provided: tuple[Artifact, ...] = ()

    @property
    def is_delta(self) -> bool:
        return bool(self.provided)

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
        # every field checked once, here (installer/bundle/manifest/); the dict stays for older readers
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
        return cls(root=root, manifest_bytes=raw, manifest=manifest,
                   artifacts=tuple(a for a in arts if a.provided is None), records=records, signature=sig,
                   provided=tuple(a for a in arts if a.provided is not None))

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
        """The artifact entry of ``path`` (in the bundle, or provided by the target: check ``provided``)."""
        for a in (*self.artifacts, *self.provided):
            if a.path == path:
                return a
        raise BundleError(f"{self.root}: {path!r} is not listed in {MANIFEST_NAME}")

    def path_of(self, artifact: Artifact | str) -> Path:
        rel = artifact.path if isinstance(artifact, Artifact) else check_relpath(artifact)
        return self.root.joinpath(*rel.split("/"))

    def total_size(self) -> int:
        """Bytes in the bundle (a delta's provided artifacts are not)."""
        return sum(a.size for a in self.artifacts)

    def provided_size(self) -> int:
        return sum(a.size for a in self.provided)

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
