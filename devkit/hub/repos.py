"""What the test hub serves: repos with their commits and refs, files, injected faults, the request log."""

from __future__ import annotations

from dataclasses import dataclass, field

from devkit.hub.content import Content

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
