"""The model-source interface: ``resolve(spec) -> PinnedModel``, ``fetch(pinned, store) -> files``.

A source pins what the manifest asked for (a branch, tag or directory) to something immutable
(a commit sha, or a content hash) together with every file's size and sha256, then makes sure each
file sits verified in the content store. Helpers shared by the sources live here too: HF-compatible
allow/ignore pattern matching, a parallel runner that keeps going when one file fails (so a re-run
only fetches what is missing), and token scrubbing for error messages.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from installer.errors import LlmPackError
from packager.errors import SourceError

if TYPE_CHECKING:
    from packager.spec import ModelSpec
    from packager.store import ContentStore

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repo root, posix
    size: int
    sha256: str  # "" only where the hub lists no sha256 (HF non-LFS files) until fetched: see with_hashes
    git_oid: str | None = None  # git blob sha1 the hub lists (HF); used to verify non-LFS files


@dataclass(frozen=True)
class PinnedModel:
    name: str
    source: str
    repo: str | None
    revision: str | None  # as requested
    commit: str  # pinned: 40-hex commit sha (HF/ModelScope), or a content hash (local dirs, see sources)
    endpoint: str | None
    files: tuple[RemoteFile, ...]  # sorted by path, after allow/ignore patterns
    # commit ids the hub names for the files where it names no commit for the revision (ModelScope: the last
    # commit that changed each file); recorded beside the content hash, not pinned by
    hub_file_commits: tuple[str, ...] = ()

    @property
    def pinned_by(self) -> str:
        """``"commit"`` if ``commit`` is the hub's commit id for the revision, else ``"content"``."""
        return "commit" if COMMIT_RE.fullmatch(self.commit) and self.source != "local" else "content"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def with_hashes(self, fetched: dict[str, Path]) -> PinnedModel:
        """A copy whose every ``sha256`` is filled from ``fetch``'s result (blob names are sha256)."""
        files = tuple(replace(f, sha256=f.sha256 or Path(fetched[f.path]).name) for f in self.files)
        return replace(self, files=files)


class Source(Protocol):
    def resolve(self, spec: ModelSpec) -> PinnedModel: ...

    def fetch(self, pinned: PinnedModel, store: ContentStore, *, jobs: int = 4,
              progress: bool = True) -> dict[str, Path]:
        """Make every file available, verified; return {relative path: a file with exactly its bytes}.

        Hub sources return content-store blobs; the local source returns the operator's own files
        (hashed in place). The build places either into the bundle with `packager.store.place_file`.
        """
        ...


# -- patterns -------------------------------------------------------------------------------------------
def _dir_wildcard(pattern: str) -> str:
    return pattern + "*" if pattern.endswith("/") else pattern


def filter_paths(paths: Iterable[T], allow: Sequence[str] = (), ignore: Sequence[str] = (),
                 key: Callable[[T], str] = str) -> list[T]:
    """Keep items whose path matches an allow pattern (if any) and no ignore pattern.

    Same semantics as ``huggingface_hub.utils.filter_repo_objects``: ``fnmatch`` on the whole posix
    path (``*`` also matches ``/``), and a pattern ending in ``/`` matches everything below it.
    """
    allow_p = [_dir_wildcard(p) for p in allow]
    ignore_p = [_dir_wildcard(p) for p in ignore]
    out = []
    for item in paths:
        path = key(item)
        if allow_p and not any(fnmatch(path, p) for p in allow_p):
            continue
        if ignore_p and any(fnmatch(path, p) for p in ignore_p):
            continue
        out.append(item)
    return out


def content_hash(files: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted ``path\\0sha256\\n`` lines: the pinned id of a file set without a commit."""
    h = hashlib.sha256()
    for path, sha in sorted(files):
        h.update(f"{path}\0{sha}\n".encode())
    return h.hexdigest()


def check_relative_path(path: str, where: str) -> str:
    """Refuse repo paths that could escape a directory (absolute, ``..``, empty segments)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise SourceError(f"{where}: refusing unsafe file path {path!r}")
    return path


# -- local disk errors while downloading -----------------------------------------------------------------
_LOCAL_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                 errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EIO: "an I/O error"}


def local_disk_error(e: BaseException, where: str) -> LlmPackError | None:
    """A download that failed on this machine's disk (not the network): say so, and where. None otherwise.

    Clients wrap such errors or not; the cause chain is searched for an OSError with a local errno.
    """
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno in _LOCAL_ERRNOS:
            path = cur.filename or "the content store"
            return SourceError(f"cannot store {where}: {_LOCAL_ERRNOS[cur.errno]} ({cur.strerror}: {path})",
                               hint="free space there or point --store / LLM_PACK_STORE at a bigger, writable "
                                    "filesystem; completed files are kept, re-run to continue")
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


# -- secrets ----------------------------------------------------------------------------------------------
def scrub(text: str, *secrets: str | None) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def env_token(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n, "").strip()
        if v:
            return v
    return None


# -- parallel fetch ---------------------------------------------------------------------------------------
class Progress:
    """One byte-counting bar per model (per-file bars come from the hub clients)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            # imported only for a visible bar: tqdm costs ~20 ms of a `pack` start (tqdm.auto ~70: asyncio)
            from tqdm.std import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    @property
    def callback(self) -> Callable[[int], None] | None:
        """:meth:`done`, or None without a visible bar (so hot loops skip the call)."""
        return self.done if self._bar is not None else None

    def done(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_all(fn: Callable[[T], None], items: Sequence[T], jobs: int, what: str) -> None:
    """Run ``fn`` on every item with ``jobs`` threads; every item is tried even when some fail.

    Completed files stay in the store, so a re-run only fetches the failed ones. Raises the first
    failure (a :class:`LlmPackError`), mentioning how many others failed.
    """
    errors: list[tuple[T, BaseException]] = []

    def one(item: T) -> None:
        try:
            fn(item)
        except Exception as e:
            errors.append((item, e))

    if jobs <= 1 or len(items) <= 1:
        for it in items:
            one(it)
    else:
        with ThreadPoolExecutor(max_workers=min(jobs, len(items)), thread_name_prefix="fetch") as pool:
            list(pool.map(one, items))
    if not errors:
        return
    first = errors[0][1]
    if len(errors) > 1:
        more = f" ({len(errors) - 1} more file(s) of {what} failed too; completed files are kept, " \
               "re-run to fetch only what is missing)"
    else:
        more = ""
    if isinstance(first, LlmPackError):
        if more:
            first.message += more
            first.args = (first.message,)
        raise first
    raise SourceError(f"{what}: {first}{more}") from first


def fetch_into_store(pinned: PinnedModel, store: ContentStore, *, source: str, what: str,
                     downloader: Callable[[Path, Path], Callable[[RemoteFile], Path]],
                     into_store: Callable[[RemoteFile, Path], Path],
                     known_sha: Callable[[RemoteFile], str | None] = lambda f: f.sha256,
                     jobs: int = 4, progress: bool = True) -> dict[str, Path]:
    """The fetch shared by the hub sources: files already in the store are taken from it, the others are
    downloaded in parallel by the hub's own client and moved into the store verified.

    ``known_sha(file)`` is the sha256 the store may already hold the file under; ``downloader(work, cache_dir)``
    is called once, only when something is missing, and returns ``download(file) -> local path`` (hub errors
    already mapped to ours); ``into_store(file, local)`` verifies and moves a download into the store (a
    download it refuses is deleted: never trusted again). The client's scratch files under
    ``<store tmp>/<source>/`` are kept on failure (for resuming) and removed once every file is in the store.
    """
    repo = pinned.repo or ""
    result: dict[str, Path] = {}
    todo: list[RemoteFile] = []
    for f in pinned.files:
        sha = known_sha(f)
        if sha and store.has(sha):
            result[f.path] = store.blob(sha)
        else:
            todo.append(f)
    if not todo:
        return result
    work = store.tmpdir() / source / repo.replace("/", "--") / pinned.commit
    download = downloader(work, store.tmpdir() / f"{source}-cache")  # the cache keeps clients out of ~/.cache
    bar = Progress(f"{pinned.name} ({len(todo)} files)", sum(f.size for f in todo), progress)
    lock = threading.Lock()

    def one(f: RemoteFile) -> None:
        local = download(f)
        try:
            blob = into_store(f, local)
        except BaseException:
            local.unlink(missing_ok=True)  # never trust this copy again
            raise
        with lock:
            result[f.path] = blob
        bar.done(f.size)

    try:
        run_all(one, todo, jobs, what)
    finally:
        bar.close()
    # every file is in the store now: drop the client's scratch files (kept on failure, for resuming)
    shutil.rmtree(work, ignore_errors=True)
    return result
