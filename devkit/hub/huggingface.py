"""The Hugging Face protocol of the test hub (measured against huggingface_hub 2.4.0): model info, the
file tree and ``resolve`` downloads, gated repos (:class:`HuggingFaceRoutes`, a part of the handler)."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote

from devkit.hub.repos import HubFile, Repo

HF_REPO = r"(?P<repo>[^/]+/[^/]+)"


class HuggingFaceRoutes:
    """``/api/models/...`` and ``/<repo>/resolve/<rev>/<file>``; mixed into :class:`~devkit.hub.handler.Handler`."""

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
        m = re.fullmatch(HF_REPO + r"(?:/revision/(?P<rev>[^/]+)|/tree/(?P<trev>[^/]+)(?:/(?P<sub>.*))?)?",
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
