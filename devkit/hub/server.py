"""A hub-compatible HTTP server for tests: speaks the Hugging Face and the ModelScope protocols.

Start it on 127.0.0.1 with a free port, define repos in the test, point the real clients at
``server.url`` (``HF_ENDPOINT`` / ``MODELSCOPE_ENDPOINT`` or the model's ``endpoint``). Protocol facts
were measured against huggingface_hub 2.4.0 and modelscope 1.40.2 (huggingface.py and modelscope.py
answer them; handler.py routes and serves the bytes, repos.py holds what is served). Faults can be
injected per file: corrupted bytes of the right size, a connection dropped after N bytes, a gated repo
that needs a token; every request is logged and counted.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

from devkit.hub.content import Content, as_content, digests
from devkit.hub.handler import Handler
from devkit.hub.repos import DEFAULT_LFS_THRESHOLD, Fault, HubFile, Repo, Request


class HubServer:
    """In-process hub on 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
                 ms_linked_etag: bool = False) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Fault] = {}
        self.log: list[Request] = []
        self.lfs_threshold = lfs_threshold
        self.ms_linked_etag = ms_linked_etag  # send X-Linked-ETag (sha256) on ModelScope downloads
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._downloads: Counter[tuple[str, str]] = Counter()
        self._httpd = _Server((host, port), Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        """Environment that points both real clients at this hub (for subprocesses such as `pack build`)."""
        return {"HF_ENDPOINT": self.url, "MODELSCOPE_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1"}

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- repos -----------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | str | Path | Content], *,
                 branch: str = "main", tags: tuple[str, ...] = (), token: str | None = None,
                 also_branches: tuple[str, ...] = ()) -> str:
        """Create (or add a commit to) a repo; return the new commit's 40-hex sha.

        ``files`` maps posix paths to contents. ``token``: the repo is gated and needs this token.
        ``branch`` (and ``also_branches``, ``tags``) point at the new commit; other refs keep theirs.
        """
        hub_files = {}
        for path, value in sorted(files.items()):
            content = as_content(value)
            sha256, oid = digests(content)
            hub_files[path] = HubFile(path, content, sha256, oid, lfs=content.size >= self.lfs_threshold)
        listing = "".join(f"{p}\0{f.git_oid}\n" for p, f in hub_files.items())
        commit = hashlib.sha1(f"{repo_id}\0{next(self._counter)}\0{listing}".encode()).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.commits[commit] = hub_files
            for ref in (branch, *also_branches, *tags):
                repo.refs[ref] = commit
            if token is not None:
                repo.token = token
        return commit

    def add_repo_from_dir(self, repo_id: str, path: Path, branch: str = "main", **kw) -> str:
        """Serve every regular file under ``path`` (read from disk on demand) as one commit."""
        root = Path(path)
        files: dict[str, bytes | str | Path | Content] = {
            p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        return self.add_repo(repo_id, files, branch=branch, **kw)

    def file(self, repo_id: str, path: str, rev: str | None = None) -> HubFile:
        """A served file, at ``rev`` (default: the commit added last)."""
        repo = self.repos[repo_id]
        commit = list(repo.commits)[-1] if rev is None else repo.resolve(rev)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {rev}")
        return repo.commits[commit][path]

    # -- faults ----------------------------------------------------------------------------------------
    def _fault(self, repo_id: str, path: str) -> Fault:
        return self.faults.setdefault((repo_id, path), Fault())

    def corrupt(self, repo_id: str, path: str, times: int | None = None) -> None:
        """Serve ``path`` with one byte flipped (same size), ``times`` times (None: always)."""
        with self._lock:
            self._fault(repo_id, path).corrupt = times

    def drop_connection(self, repo_id: str, path: str, after_bytes: int, times: int | None = 1) -> None:
        """Close the connection after ``after_bytes`` of the body, ``times`` times (None: always)."""
        with self._lock:
            f = self._fault(repo_id, path)
            f.drop_after, f.drops = after_bytes, times

    def fail(self, repo_id: str, path: str, status: int = 500, times: int | None = None) -> None:
        with self._lock:
            f = self._fault(repo_id, path)
            f.status, f.statuses = status, times

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    # -- observations ----------------------------------------------------------------------------------
    def downloads(self, repo_id: str, path: str) -> int:
        """How many GET requests for the bytes of this file were answered (both protocols)."""
        with self._lock:
            return self._downloads[(repo_id, path)]

    def total_downloads(self) -> int:
        with self._lock:
            return sum(self._downloads.values())

    def requests_matching(self, pattern: str) -> list[Request]:
        rx = re.compile(pattern)
        with self._lock:
            return [r for r in self.log if rx.search(r.path)]

    def _record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)

    def _count_download(self, repo_id: str, path: str) -> None:
        with self._lock:
            self._downloads[(repo_id, path)] += 1

    def _take(self, repo_id: str, path: str) -> tuple[bool, int | None, int | None]:
        """Consume this request's faults: (corrupt?, drop after N bytes or None, status or None)."""
        with self._lock:
            f = self.faults.get((repo_id, path))
            if f is None:
                return False, None, None

            def use(attr: str) -> bool:
                left = getattr(f, attr)
                if left is None:
                    return True
                if left > 0:
                    setattr(f, attr, left - 1)
                    return True
                return False

            status = f.status if f.status is not None and use("statuses") else None
            corrupt = use("corrupt")
            drop = f.drop_after if f.drop_after is not None and use("drops") else None
            return corrupt, drop, status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer
