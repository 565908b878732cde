"""The test hub's HTTP handler: routing, the request log, answers, and the bytes of a file (ranges and
injected faults) for both protocols (:mod:`devkit.hub.huggingface`, :mod:`devkit.hub.modelscope`)."""

from __future__ import annotations

import json
import re
import socket
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from devkit.hub.huggingface import HF_REPO, HuggingFaceRoutes
from devkit.hub.modelscope import ModelScopeRoutes
from devkit.hub.repos import HubFile, Request

if TYPE_CHECKING:
    from devkit.hub.server import HubServer, _Server


class Handler(HuggingFaceRoutes, ModelScopeRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

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
        m = re.fullmatch(HF_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path.lstrip("/"))
        if m:
            return self._hf_resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head)
        self._json(404, {"error": f"no route for {path}"}, head=head)

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
