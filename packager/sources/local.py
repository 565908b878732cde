"""Local directory source: a model the operator already has (a git-lfs clone, ``hf download --local-dir``).

resolve walks ``spec.path``, applies allow/ignore patterns (HF semantics) and hashes every file in
place, read only, on worker threads (in parallel). `pack build` resolves with ``defer_hash=True``: files
the stat cache does not know are not hashed here but once, after they were hardlinked into the bundle
(what is signed is what was read, in one pass); :func:`remember_hash` then fills the stat cache.
Nothing is copied into the content store.
``commit`` is the sha256 over the sorted ``(path, sha256)`` list, ``repo`` the directory's absolute
real path, ``revision`` None. A stat cache in the store's aliases (path, device, inode, size, mtime
-> sha256) makes resolving an unchanged directory again cost no hashing.

fetch returns ``{path: the real source file}`` after checking that each file still has the stat it
was hashed with (a file whose stat changed is hashed again; if its sha256 is no longer the pinned one
that is an :class:`IntegrityError` naming it). The build then places those files into the bundle with
:func:`packager.store.place_file`: a hardlink to the operator's file where it can (no bytes copied),
else a reflink or a verified copy. See :mod:`packager.store` for why sharing the inode is safe (every
later edit in place is caught by ``pack verify`` and install.sh against the signed manifest). The
cache key leaves out ctime because the hardlink into a bundle changes it; within one build, resolve
and fetch still compare the full stat, ctime included.

Skipped: ``.git/`` and ``.cache/huggingface/`` (client metadata). Symlinks are followed to the real
file only if the target stays inside the directory; otherwise it is an error (so a hub cache
snapshot, whose files link to ``../../blobs``, is refused: point ``path:`` at real files). A git-lfs
pointer file (a clone without ``git lfs pull``) is an error too.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import closing
from pathlib import Path

from installer.errors import IntegrityError, UsageError
from packager.errors import NotFoundError, SourceError
from packager.hashing import hash_files
from packager.sources.base import PinnedModel, Progress, RemoteFile, content_hash, filter_paths
from packager.spec import ModelSpec
from packager.store import ContentStore

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
SKIPPED = (".git/", ".cache/huggingface/")
STAT_ALIAS = "local-stat"
CHANGED_HINT = "the model directory changed since it was resolved (or while it was hashed); build again"


def _skipped(rel: str) -> bool:
    return rel == ".git" or any(rel.startswith(p) for p in SKIPPED)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def walk_model_dir(root: Path) -> list[tuple[str, Path]]:
    """``[(posix relative path, real file path)]`` for every regular file under ``root``, sorted."""
    root_real = root.resolve()
    out: list[tuple[str, Path]] = []
    visited = {root_real}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if _skipped(rel):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if not _inside(target, root_real):
                    raise SourceError(
                        f"{root}/{rel} is a symlink to {target}, outside the model directory {root}",
                        hint="copy the real files into the directory (a hub cache snapshot links to "
                        "../../blobs: use `hf download --local-dir DIR` and point `path:` at DIR)")
                if target.is_dir():
                    if target not in visited:  # a link back up would loop forever
                        visited.add(target)
                        walk(target, rel + "/")
                elif target.is_file():
                    out.append((rel, target))
                else:
                    raise SourceError(f"{root}/{rel} is a dangling symlink (to {target})")
            elif entry.is_dir(follow_symlinks=False):
                walk(path, rel + "/")
            elif entry.is_file(follow_symlinks=False):
                out.append((rel, path))
            else:
                raise SourceError(f"{root}/{rel} is not a regular file (device, socket or fifo)")

    walk(root_real, "")
    return sorted(out)


def _stat_key(path: Path, st: os.stat_result) -> str:
    # No ctime: hardlinking the file into a bundle changes it, which made every rebuild re-hash everything.
    # An in-place edit that keeps both the size and the exact mtime_ns is missed here, but never silently:
    # `pack verify` and install.sh check every sha256 against the signed MANIFEST.json.
    raw = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == \
        (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _hash_in_place(items: list[tuple[str, Path]], store: ContentStore, jobs: int,
                   bar: Progress) -> dict[str, tuple[str, int]]:
    """Hash ``(rel, src)`` files where they are (read only); ``{rel: (sha256, size)}``.

    Each result is remembered in the stat cache under the stat taken before hashing, and only if the
    file still has that stat afterwards (otherwise it changed while we read it: an error).
    """
    rels: dict[Path, list[str]] = {}  # a file linked in twice (symlink inside the dir) is hashed once
    for rel, src in items:
        rels.setdefault(src, []).append(rel)
    before = {src: src.stat() for src in rels}
    results: dict[str, tuple[str, int]] = {}
    try:
        biggest_first = sorted(before, key=lambda src: -before[src].st_size)
        with closing(hash_files(biggest_first, jobs=jobs, ordered=False, on_bytes=bar.callback)) as hashed:
            for name, sha, size in hashed:
                src = Path(name)
                st = before[src]
                if size != st.st_size or not _same(src.stat(), st):
                    raise SourceError(f"{src} changed while it was hashed", hint=CHANGED_HINT)
                store.record_alias(STAT_ALIAS, _stat_key(src, st), sha)
                for rel in rels[src]:
                    results[rel] = (sha, size)
    except OSError as e:
        name = getattr(e, "filename", None) or "a file"
        raise SourceError(f"cannot read {name} of the model directory: {e.strerror or e}",
                          hint=CHANGED_HINT) from e
    return results


class LocalSource:
    name = "local"

    def __init__(self, store: ContentStore | None = None, jobs: int | None = None, progress: bool = False,
                 defer_hash: bool = False) -> None:
        self.store = store
        self.jobs = jobs or min(os.cpu_count() or 1, 8)
        self.progress = progress
        # `pack build`: files the stat cache does not know are not hashed here but once, in the bundle,
        # after they were hardlinked there (their sha256 is "" and ``commit`` "" until then): what is
        # signed is what was read, in one pass (see packager.bundle_writer.BundleWriter)
        self.defer_hash = defer_hash

    def resolve(self, spec: ModelSpec) -> PinnedModel:
        if spec.path is None:
            raise UsageError(f"model {spec.name}: source local needs `path: /dir/with/the/model`")
        root = Path(spec.path).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise NotFoundError(f"model {spec.name}: {root} {what}",
                                hint="`path:` must be a directory holding the model files")
        root_real = root.resolve()
        entries = walk_model_dir(root_real)
        kept = filter_paths(entries, spec.allow_patterns, spec.ignore_patterns, key=lambda e: e[0])
        if not kept:
            raise NotFoundError(
                f"model {spec.name}: no file in {root} matches allow_patterns {list(spec.allow_patterns)} / "
                f"ignore_patterns {list(spec.ignore_patterns)}")
        for rel, src in kept:
            if src.stat().st_size < 1024:
                with open(src, "rb") as fh:
                    if fh.read(len(LFS_POINTER)) == LFS_POINTER:
                        raise SourceError(f"{root}/{rel} is a git-lfs pointer, not the file itself",
                                          hint=f"run `git lfs pull` in {root}")
        store = self.store or ContentStore.default()
        known, todo = _cached(kept, store)
        if self.defer_hash:
            files = tuple(RemoteFile(rel, known[rel][1] if rel in known else src.stat().st_size,
                                     known[rel][0] if rel in known else "") for rel, src in kept)
            return PinnedModel(name=spec.name, source=self.name, repo=str(root_real), revision=None,
                               commit="", endpoint=None, files=files)
        bar = Progress(f"{spec.name} (hashing {len(todo)} files)", _bytes(todo), self.progress and bool(todo))
        try:
            known.update(_hash_in_place(todo, store, self.jobs, bar))
        finally:
            bar.close()
        files = tuple(RemoteFile(rel, known[rel][1], known[rel][0]) for rel, _ in kept)
        return PinnedModel(name=spec.name, source=self.name, repo=str(root_real), revision=None,
                           commit=content_hash((f.path, f.sha256) for f in files), endpoint=None, files=files)

    def fetch(self, pinned: PinnedModel, store: ContentStore, *, jobs: int = 4,
              progress: bool = True) -> dict[str, Path]:
        """``{path: real source file}``, each checked to still be what was pinned (nothing is copied)."""
        root = Path(pinned.repo or "")
        sources = dict(walk_model_dir(root)) if root.is_dir() else {}
        kept: list[tuple[str, Path]] = []
        for f in pinned.files:
            if f.path not in sources:
                raise NotFoundError(f"{root}/{f.path} is gone since the model was resolved", hint=CHANGED_HINT)
            kept.append((f.path, sources[f.path]))
        known, todo = _cached(kept, store)
        deferred = {f.path for f in pinned.files if not f.sha256}  # hashed in the bundle, by the build
        todo = [(rel, src) for rel, src in todo if rel not in deferred]
        if todo:  # stat changed since resolve (or another store): hash again, the pin decides
            bar = Progress(f"{pinned.name} (re-hashing {len(todo)} files)",
                           _bytes(todo), progress)
            try:
                known.update(_hash_in_place(todo, store, jobs, bar))
            finally:
                bar.close()
        for f in pinned.files:
            if f.path in deferred:
                continue
            sha, size = known[f.path]
            if sha != f.sha256 or size != f.size:
                raise IntegrityError(f"{root}/{f.path}", expected=f.sha256, actual=sha, hint=CHANGED_HINT)
        return {rel: src for rel, src in kept}


def remember_hash(store: ContentStore, src: Path, before: os.stat_result, sha256: str) -> bool:
    """Record ``sha256`` in the stat cache for ``src`` if it still has the stat ``before`` (taken before
    its bytes were read elsewhere, e.g. through a hardlink in the bundle). False if it changed."""
    try:
        now = src.stat()
    except OSError:
        return False
    if _stat_key(src, now) != _stat_key(src, before):
        return False
    store.record_alias(STAT_ALIAS, _stat_key(src, before), sha256)
    return True


def forget_hash(store: ContentStore, src: Path) -> None:
    """Drop the stat cache entry of ``src`` (its bytes are not what the cache said: edited in place with
    the size and mtime kept, or rotted), so the next build hashes it again."""
    try:
        store.drop_alias(STAT_ALIAS, _stat_key(src, src.stat()))
    except OSError:
        pass


def _cached(items: list[tuple[str, Path]], store: ContentStore
            ) -> tuple[dict[str, tuple[str, int]], list[tuple[str, Path]]]:
    """Split ``(rel, src)`` into ``{rel: (sha256, size)}`` known from the stat cache and the rest to hash."""
    known: dict[str, tuple[str, int]] = {}
    todo: list[tuple[str, Path]] = []
    for rel, src in items:
        st = src.stat()
        sha = store.lookup_alias(STAT_ALIAS, _stat_key(src, st), require_blob=False)
        if sha:
            known[rel] = (sha, st.st_size)
        else:
            todo.append((rel, src))
    return known, todo


def _bytes(items: list[tuple[str, Path]]) -> int:
    return sum(src.stat().st_size for src in {src for _, src in items})
