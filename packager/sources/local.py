"""Local directory source: a model the operator already has (a git-lfs clone, ``hf download --local-dir``).

resolve walks ``spec.path``, applies allow/ignore patterns (HF semantics), and copies every file into
the content store, hashing it in the same pass (worker processes, in parallel). ``commit`` is the
sha256 over the sorted ``(path, sha256)`` list, ``repo`` the directory's absolute real path,
``revision`` None. A stat cache in the store (device, inode, size, mtime, ctime -> sha256) makes
resolving an unchanged directory again cost no hashing. fetch then finds every blob in the store; if
it is given another store it copies from the directory again and checks each sha256 (a file changed
since resolve fails, named).

Skipped: ``.git/`` and ``.cache/huggingface/`` (client metadata). Symlinks are followed to the real
file only if the target stays inside the directory; otherwise it is an error (so a hub cache
snapshot, whose files link to ``../../blobs``, is refused: point ``path:`` at real files). A git-lfs
pointer file (a clone without ``git lfs pull``) is an error too.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import as_completed
from pathlib import Path

from installer.errors import IntegrityError, LlmPackError, NotFoundError, SourceError, UsageError
from packager.hashing import PARALLEL_MIN_BYTES, process_pool
from packager.sources.base import PinnedModel, Progress, RemoteFile, content_hash, filter_paths
from packager.spec import ModelSpec
from packager.store import ContentStore

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
SKIPPED = (".git/", ".cache/huggingface/")
STAT_ALIAS = "local-stat"
CHANGED_HINT = "the directory changed since it was resolved (or while it was copied); build again"


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
    raw = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()


def _ingest_one(args: tuple[str, str, str, str | None, int]) -> tuple[str, int]:
    """Worker: copy one file into the store, hashing it in the same pass; ``(sha256, size)``."""
    store_root, src, name, expected_sha, size = args
    blob = ContentStore(Path(store_root)).add_file(Path(src), expected_sha256=expected_sha, expected_size=size,
                                                   name=name, move=False, hint=CHANGED_HINT)
    return blob.name, size


def _ingest_worker(args: tuple[str, str, str, str | None, int]) -> tuple:
    # our errors take keyword-only arguments and do not survive pickling: send their fields back
    try:
        return ("ok", *_ingest_one(args))
    except IntegrityError as e:
        return ("integrity", e.path, e.expected, e.actual, e.what)


def _unwrap(res: tuple) -> tuple[str, int]:
    if res[0] == "integrity":
        raise IntegrityError(res[1], expected=res[2], actual=res[3], what=res[4], hint=CHANGED_HINT)
    return res[1], res[2]


def _ingest(items: list[tuple[str, Path, str | None]], store: ContentStore, jobs: int,
            bar: Progress) -> dict[str, tuple[str, int]]:
    """Copy ``(rel, src, expected sha256 or None)`` items into the store; ``{rel: (sha256, size)}``.

    Every item is tried; the first failure is raised afterwards (completed files stay in the store).
    """
    results: dict[str, tuple[str, int]] = {}
    errors: list[BaseException] = []
    tasks = []
    for rel, src, expected in items:
        st = src.stat()
        tasks.append((rel, src, st, (str(store.root), str(src), rel, expected, st.st_size)))

    def finish(rel: str, src: Path, st: os.stat_result, sha: str, size: int) -> None:
        after = src.stat()
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            raise SourceError(f"{src} changed while it was copied into the store", hint=CHANGED_HINT)
        store.record_alias(STAT_ALIAS, _stat_key(src, st), sha)
        results[rel] = (sha, size)
        bar.done(size)

    total = sum(t[2].st_size for t in tasks)
    if jobs <= 1 or len(tasks) <= 1 or total < PARALLEL_MIN_BYTES:
        for rel, src, st, args in tasks:
            try:
                finish(rel, src, st, *_ingest_one(args))
            except Exception as e:
                errors.append(e)
    else:
        with process_pool(min(jobs, len(tasks))) as pool:
            futures = {pool.submit(_ingest_worker, args): (rel, src, st) for rel, src, st, args in tasks}
            for fut in as_completed(futures):
                rel, src, st = futures[fut]
                try:
                    finish(rel, src, st, *_unwrap(fut.result()))
                except Exception as e:
                    errors.append(e)
    if errors:
        first = errors[0]
        if isinstance(first, LlmPackError):
            raise first
        raise SourceError(f"copying into the content store failed: {first}") from first
    return results


class LocalSource:
    name = "local"

    def __init__(self, store: ContentStore | None = None, jobs: int | None = None) -> None:
        self.store = store
        self.jobs = jobs or min(os.cpu_count() or 1, 8)

    def resolve(self, spec: ModelSpec, *, progress: bool = False) -> PinnedModel:
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
        known: dict[str, tuple[str, int]] = {}
        todo: list[tuple[str, Path, str | None]] = []
        for rel, src in kept:
            st = src.stat()
            sha = store.lookup_alias(STAT_ALIAS, _stat_key(src, st))
            if sha:
                known[rel] = (sha, st.st_size)
            else:
                todo.append((rel, src, None))
        bar = Progress(f"{spec.name} (hashing {len(todo)} files)", sum(s.stat().st_size for _, s, _ in todo),
                       progress and bool(todo))
        try:
            known.update(_ingest(todo, store, self.jobs, bar))
        finally:
            bar.close()
        files = tuple(RemoteFile(rel, known[rel][1], known[rel][0]) for rel, _ in kept)
        return PinnedModel(name=spec.name, source=self.name, repo=str(root_real), revision=None,
                           commit=content_hash((f.path, f.sha256) for f in files), endpoint=None, files=files)

    def fetch(self, pinned: PinnedModel, store: ContentStore, *, jobs: int = 4,
              progress: bool = True) -> dict[str, Path]:
        result: dict[str, Path] = {}
        todo: list[tuple[str, Path, str | None]] = []
        root = Path(pinned.repo or "")
        sources = dict(walk_model_dir(root)) if any(not store.has(f.sha256) for f in pinned.files) else {}
        for f in pinned.files:
            if store.has(f.sha256):
                result[f.path] = store.blob(f.sha256)
            elif f.path in sources:
                todo.append((f.path, sources[f.path], f.sha256))
            else:
                raise NotFoundError(f"{root}/{f.path} is gone since the model was resolved", hint=CHANGED_HINT)
        if todo:
            bar = Progress(f"{pinned.name} ({len(todo)} files)", sum(s.stat().st_size for _, s, _ in todo),
                           progress)
            try:
                done = _ingest(todo, store, jobs, bar)
            finally:
                bar.close()
            for rel, (sha, _) in done.items():
                result[rel] = store.blob(sha)
        return result
