"""The ModelScope protocol of the test hub (measured against modelscope 1.40.2): model info, revisions,
file lists and downloads (:class:`ModelScopeRoutes`, a part of the handler)."""

from __future__ import annotations

import re
from urllib.parse import unquote

from devkit.hub.huggingface import HF_REPO


class ModelScopeRoutes:
    """``/api/v1/models/...``; mixed into :class:`~devkit.hub.handler.Handler`."""

    def _ms_error(self, status: int, message: str, head: bool) -> None:
        self._json(status, {"Code": status, "Message": message, "Success": False,
                            "RequestId": "test-hub"}, head=head)

    def _modelscope(self, rest: str, head: bool) -> None:
        m = re.fullmatch(HF_REPO + r"(?P<tail>/repo/files|/repo|/revisions)?", rest)
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
