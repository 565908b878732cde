"""A hub-compatible HTTP server for tests: speaks the Hugging Face and the ModelScope protocols.

Start it on 127.0.0.1 with a free port, define repos in the test, point the real clients at
``server.url`` (``HF_ENDPOINT`` / ``MODELSCOPE_ENDPOINT`` or the model's ``endpoint``). Protocol facts
were measured against huggingface_hub 2.4.0 and modelscope 1.40.2 (see the module docstrings of the
handlers below). Faults can be injected per file: corrupted bytes of the right size, a connection
dropped after N bytes, a gated repo that needs a token; every request is logged and counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from devkit.hub.content import Content, as_content, digests

# The HF hub stores files above this size in LFS (it lists a sha256 for them); below, only a git oid.
DEFAULT_LFS_THRESHOLD = 1024


@dataclass
class HubFile:
    path: str
    content: Content
    sha256: str
    git_oid: str
    lfs: bool

    @property
    def size(self) -> int:
        return self.content.size


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    token: str | None = None  # gated: requests must carry this token

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        return None

    def last_change(self, commit: str, path: str) -> tuple[str, int]:
        """(commit, index) of the last commit up to ``commit`` (history = the order commits were added) that
        changed ``path``: what ModelScope lists as a file's ``Revision`` ("commit id") and ``CommittedDate``."""
        order = list(self.commits)
        last = None
        prev = None
        for i, c in enumerate(order[:order.index(commit) + 1]):
            f = self.commits[c].get(path)
            now = f.sha256 if f is not None else None
            if now is not None and now != prev:
                last = (c, i)
            prev = now
        assert last is not None, (commit, path)
        return last


@dataclass
class Fault:
    corrupt: int | None = 0  # serve corrupted bytes this many more times (None: always)
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int | None = 0  # ... this many more times (None: always)
    status: int | None = None  # answer file downloads with this HTTP status
    statuses: int | None = 0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    status: int = 0


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
        self._httpd = _Server((host, port), _Handler)
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


_HF_REPO = r"(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    # -- plumbing ---------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        self._status = 0
        self._req: Request | None = None
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.raw_path = split.path
        req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self._req = req
        self.hub._record(req)  # before answering: a client may act on the answer at once
        try:
            self._route(split.path, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            req.status = self._status

    def _set_status(self, status: int) -> None:
        self._status = status
        if self._req is not None:
            self._req.status = status

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False, content_type: str = "application/json") -> None:
        self._set_status(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "m_session_id":
                return v
        return None

    def _route(self, path: str, head: bool) -> None:
        if path == "/api/v1/repos/internalAccelerationInfo":
            return self._json(404, {"Code": 404, "Message": "not found"}, head=head)
        if path.startswith("/api/v1/models/"):
            return self._modelscope(path[len("/api/v1/models/"):], head)
        if path.startswith("/api/models/"):
            return self._hf_api(path[len("/api/models/"):], head)
        m = re.fullmatch(_HF_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path.lstrip("/"))
        if m:
            return self._hf_resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head)
        self._json(404, {"error": f"no route for {path}"}, head=head)

    # -- Hugging Face --------------------------------------------------------------------------------------
    def _hf_error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers, head)

    def _hf_repo(self, repo_id: str, head: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            # the real hub answers 401 for a missing repo when unauthenticated, 404 otherwise
            self._hf_error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.token is not None:
            given = self._token()
            if given is None:
                self._hf_error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.", head)
                return None
            if given != repo.token:
                self._hf_error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not "
                               "in the authorized list.", head)
                return None
        return repo

    def _hf_api(self, rest: str, head: bool) -> None:
        m = re.fullmatch(_HF_REPO + r"(?:/revision/(?P<rev>[^/]+)|/tree/(?P<trev>[^/]+)(?:/(?P<sub>.*))?)?",
                         rest)
        if not m:
            return self._json(404, {"error": "unknown api route"}, head=head)
        repo = self._hf_repo(unquote(m["repo"]), head)
        if repo is None:
            return
        rev = unquote(m["rev"] or m["trev"] or "main")
        commit = repo.resolve(rev)
        if commit is None:
            return self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        files = repo.commits[commit]
        if m["trev"] is None:
            body = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.token else False, "disabled": False, "tags": [],
                    "siblings": [{"rfilename": p} for p in files]}
            if self.query.get("blobs") in ("True", "true", "1"):
                for sib in body["siblings"]:
                    f = files[sib["rfilename"]]
                    sib.update({"blobId": f.git_oid, "size": f.size})
                    if f.lfs:
                        sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            return self._json(200, body, {"X-Repo-Commit": commit}, head)
        sub = unquote(m["sub"] or "").strip("/")
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        return self._json(200, _hf_tree(files, sub, recursive), head=head)

    def _hf_resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._hf_repo(repo_id, head)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        f = repo.commits[commit].get(path)
        if f is None:
            return self._hf_error(404, "EntryNotFound", f"{path} does not exist at {rev}", head, commit)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["ETag"] = f'"{f.sha256}"'
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        else:
            headers["ETag"] = f'"{f.git_oid}"'
        self._serve_file(repo.repo_id, f, headers, head)

    # -- ModelScope ----------------------------------------------------------------------------------------
    def _ms_error(self, status: int, message: str, head: bool) -> None:
        self._json(status, {"Code": status, "Message": message, "Success": False,
                            "RequestId": "test-hub"}, head=head)

    def _modelscope(self, rest: str, head: bool) -> None:
        m = re.fullmatch(_HF_REPO + r"(?P<tail>/repo/files|/repo|/revisions)?", rest)
        if not m:
            return self._ms_error(404, "unknown api route", head)
        repo_id = unquote(m["repo"])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._ms_error(404, f"model {repo_id} does not exist", head)
        if repo.token is not None and self._token() != repo.token:
            status = 401 if self._token() is None else 403
            return self._ms_error(status, f"access to model {repo_id} is denied", head)
        tail = m["tail"]
        if tail is None:
            return self._json(200, {"Code": 200, "Success": True,
                                    "Data": {"Id": 1, "Path": repo_id.split("/")[0],
                                             "Name": repo_id.split("/")[1]}}, head=head)
        if tail == "/revisions":
            tags = [{"Revision": r, "CreatedAt": 0} for r in repo.refs if r.startswith("v")]
            branches = [{"Revision": r, "CreatedAt": 0} for r in repo.refs if not r.startswith("v")]
            return self._json(200, {"Code": 200, "Success": True,
                                    "Data": {"RevisionMap": {"Branches": branches, "Tags": tags}}}, head=head)
        rev = self.query.get("Revision") or "master"
        commit = repo.resolve(rev)
        if commit is None:
            return self._ms_error(404, f"revision {rev} of model {repo_id} does not exist", head)
        files = repo.commits[commit]
        if tail == "/repo/files":
            entries = []
            dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
            for d in dirs:
                entries.append({"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0})
            for p, f in files.items():
                # like ModelScope: a file's Revision is the commit that last changed it, not the branch head
                changed, index = repo.last_change(commit, p)
                entries.append({"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": f.size,
                                "Sha256": f.sha256, "Revision": changed, "CommittedDate": 1_700_000_000 + index,
                                "IsLFS": f.lfs})
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": entries}}, head=head)
        path = self.query.get("FilePath", "")
        f = files.get(path)
        if f is None:
            return self._ms_error(404, f"file {path} does not exist", head)
        headers = {"Accept-Ranges": "bytes"}
        if self.hub.ms_linked_etag:
            headers["X-Linked-ETag"] = f'"{f.sha256}"'
        self._serve_file(repo_id, f, headers, head, content_type="application/octet-stream")

    # -- file bytes (both protocols) -----------------------------------------------------------------------
    def _serve_file(self, repo_id: str, f: HubFile, headers: dict[str, str], head: bool,
                    content_type: str = "application/octet-stream") -> None:
        size = f.size
        start, end = 0, size
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m[1]) >= max(size, 1):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, head)
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}
        if head:
            self._set_status(200)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            for k, v in headers.items():
                if k != "Content-Range":
                    self.send_header(k, v)
            self.end_headers()
            return
        corrupt, drop_after, fail_status = self.hub._take(repo_id, f.path)
        if fail_status is not None:
            return self._send(fail_status, b'{"error": "injected failure"}', None, head)
        self.hub._count_download(repo_id, f.path)
        self._set_status(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        flip = size // 2 if corrupt and size else None
        sent = 0
        for chunk in f.content.read(start, end):
            pos = start + sent
            if flip is not None and pos <= flip < pos + len(chunk):
                b = bytearray(chunk)
                b[flip - pos] ^= 0xFF
                chunk = bytes(b)
            if drop_after is not None and sent + len(chunk) > drop_after:
                self.wfile.write(chunk[:max(drop_after - sent, 0)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(chunk)
            sent += len(chunk)


def _hf_tree(files: dict[str, HubFile], sub: str, recursive: bool) -> list[dict]:
    prefix = f"{sub}/" if sub else ""
    out: list[dict] = []
    seen_dirs: set[str] = set()
    for p, f in files.items():
        if not p.startswith(prefix):
            continue
        rel = p[len(prefix):]
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = prefix + "/".join(parts[:i])
            if d not in seen_dirs and (recursive or i == 1):
                seen_dirs.add(d)
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                            "path": d})
        if not recursive and len(parts) > 1:
            continue
        entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": p}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        out.append(entry)
    return out
