"""ModelScope source, through the real ``modelscope`` client (1.40.x delegates to ``modelscope_hub``).

resolve: the client's raw listing ``HubApi.legacy.list_repo_files(repo, "model", revision=...,
recursive=True)`` (GET ``/api/v1/models/{id}/repo/files``; the client's normalised ``list_repo_files``
drops the commit ids) gives every file's path, size, sha256 and ``Revision``: the commit id of the last
commit that changed that file (the client's own cache keeps it as the file's "commit id").

What is pinned, precisely: ModelScope names no commit for a branch or tag (``/revisions`` lists only names
and dates, and the per-file commit ids are the last change of each file, not the branch head: a later commit
that deleted a file appears nowhere). So a revision that is a 40-hex commit id is pinned as is
(``pinned_by: commit``); a branch or tag is pinned by content (``pinned_by: content``): ``commit`` = sha256
over the sorted ``(path, sha256)`` list (the same content hash the local source uses), and the commit ids
ModelScope lists for those files are recorded beside it (``hub_file_commits``, for the audit trail). Every
file is checked against its listed sha256, so if the branch moves between resolve and fetch the build fails
naming the file instead of mixing two versions.

fetch: ``HubApi.download_file(repo, "model", path, revision=..., local_dir=<store tmp>, file_size=...)``
per missing file, ``jobs`` at a time, then our own size + sha256 check and a rename into the content
store. The client keeps ``<file>.incomplete`` under a stable name and resumes it with a Range request,
within a run and across runs. We do not pass ``expected_sha256`` to the client: it would retry a
mismatching file 3 times with back-off before failing; we verify once and name the file.

Endpoint: ``spec.endpoint``, else ``$MODELSCOPE_ENDPOINT``, else https://www.modelscope.cn. Token:
``$MODELSCOPE_API_TOKEN`` only (a token saved by ``modelscope login`` is not used); never written
or shown. The client's cache and lock dirs are pointed inside the content store's tmp dir.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import requests
from modelscope.hub.api import HubApi
from modelscope_hub.errors import (
    APIError,
    AuthenticationError,
    FileIntegrityError,
    FileSizeMismatchError,
    HubError,
    NetworkError,
    NotExistError,
    PermissionDeniedError,
)

from installer.errors import IntegrityError, LlmPackError, UsageError
from packager.errors import AuthError, NotFoundError, SourceError
from packager.sources.base import (
    COMMIT_RE,
    PinnedModel,
    RemoteFile,
    check_relative_path,
    content_hash,
    env_token,
    fetch_into_store,
    filter_paths,
    local_disk_error,
    scrub,
)
from packager.spec import ModelSpec
from packager.store import ContentStore

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
TOKEN_VARS = ("MODELSCOPE_API_TOKEN",)
CORRUPT_HINT = ("ModelScope served bytes that differ from what it lists; the bad download was discarded, "
                "re-run to fetch it again (if it persists, the branch moved: build again to re-resolve)")


def ms_endpoint(spec_endpoint: str | None) -> str:
    return (spec_endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _api(endpoint: str, token: str | None) -> HubApi:
    # token "" (not None): do not fall back to credentials saved by `modelscope login`
    return HubApi(endpoint=endpoint, token=token or "")


class ModelScopeSource:
    name = "modelscope"

    def resolve(self, spec: ModelSpec) -> PinnedModel:
        if not spec.repo:
            raise UsageError(f"model {spec.name}: source modelscope needs `repo: org/name`")
        endpoint = ms_endpoint(spec.endpoint)
        token = env_token(*TOKEN_VARS)
        rev = spec.revision or "master"
        api = _api(endpoint, token)
        try:
            infos = api.legacy.list_repo_files(repo_id=spec.repo, repo_type="model", revision=rev, recursive=True)
        except NotExistError as e:
            raise self._not_found(api, spec.repo, rev, endpoint, token) from e
        except Exception as e:
            raise map_error(e, repo=spec.repo, revision=rev, endpoint=endpoint, token=token) from e
        blobs = [i for i in infos if isinstance(i, dict) and (i.get("Type") or i.get("type") or "blob") != "tree"]
        if not blobs:
            # some servers answer an unknown revision with an empty listing
            raise self._not_found(api, spec.repo, rev, endpoint, token)
        files = []
        file_commits: dict[str, str] = {}
        for i in blobs:
            path = check_relative_path(str(i.get("Path") or i.get("path") or ""), f"{spec.repo}@{rev}")
            sha = str(i.get("Sha256") or i.get("sha256") or "").lower()
            if len(sha) != 64 or not SHA256_RE.fullmatch(sha):
                raise SourceError(f"{endpoint} lists no sha256 for {spec.repo}/{path} at {rev}; "
                                  "cannot verify it", hint="is the endpoint a ModelScope compatible hub?")
            try:
                size = int(i.get("Size") or i.get("size") or 0)
            except (TypeError, ValueError):
                size = -1
            if size < 0:
                raise SourceError(f"{endpoint} lists a bad size for {spec.repo}/{path} at {rev}: "
                                  f"{i.get('Size')!r}", hint="is the endpoint a ModelScope compatible hub?")
            files.append(RemoteFile(path, size, sha))
            file_commit = str(i.get("Revision") or "").lower()
            if COMMIT_RE.fullmatch(file_commit):
                file_commits[path] = file_commit
        kept = sorted(filter_paths(files, spec.allow_patterns, spec.ignore_patterns, key=lambda f: f.path),
                      key=lambda f: f.path)
        if not kept:
            raise NotFoundError(
                f"model {spec.name}: no file of {spec.repo}@{rev} matches allow_patterns "
                f"{list(spec.allow_patterns)} / ignore_patterns {list(spec.ignore_patterns)}",
                hint=f"the repo has: {', '.join(f.path for f in files[:12])}")
        commit = rev if COMMIT_RE.fullmatch(rev) else content_hash((f.path, f.sha256) for f in kept)
        return PinnedModel(name=spec.name, source=self.name, repo=spec.repo, revision=rev, commit=commit,
                           endpoint=endpoint, files=tuple(kept),
                           hub_file_commits=tuple(sorted({file_commits[f.path] for f in kept
                                                          if f.path in file_commits})))

    @staticmethod
    def _not_found(api: HubApi, repo: str, rev: str, endpoint: str, token: str | None) -> LlmPackError:
        try:
            refs = api.list_repo_revisions(repo, "model")
        except NotExistError:
            return NotFoundError(f"repository {repo} not found at {endpoint}",
                                 hint="check the model id (org/name); a private model also looks missing "
                                 "without a token: set MODELSCOPE_API_TOKEN")
        except Exception as e:
            return map_error(e, repo=repo, revision=rev, endpoint=endpoint, token=token)
        names = [r.get("Revision") for r in refs if isinstance(r, dict) and r.get("Revision")]
        return NotFoundError(f"revision {rev!r} of {repo} not found at {endpoint}",
                             hint=f"branches and tags there: {', '.join(names) or '(none listed)'}")

    def fetch(self, pinned: PinnedModel, store: ContentStore, *, jobs: int = 4,
              progress: bool = True) -> dict[str, Path]:
        repo = pinned.repo or ""
        endpoint = pinned.endpoint or ms_endpoint(None)
        token = env_token(*TOKEN_VARS)
        rev = pinned.commit if COMMIT_RE.fullmatch(pinned.commit) else (pinned.revision or "master")

        def downloader(work: Path, cache_dir: Path):  # cache_dir: the client puts its lock files there
            api = _api(endpoint, token)

            def download(f: RemoteFile) -> Path:
                try:
                    return Path(api.download_file(repo, "model", f.path, revision=rev, local_dir=work,
                                                  cache_dir=cache_dir, file_size=f.size))
                except FileIntegrityError as e:
                    if isinstance(e, FileSizeMismatchError):
                        raise IntegrityError(f"{repo}/{f.path}", expected=f"{f.size} bytes",
                                             actual=_first_line(e), what="size", hint=CORRUPT_HINT) from e
                    # the client checked a sha256 the CDN sent (X-Linked-ETag) and gave up after its retries
                    m = re.search(r"got ([0-9a-f]+)", str(e))
                    raise IntegrityError(f"{repo}/{f.path}", expected=f.sha256,
                                         actual=f"{m[1]}..." if m else "different bytes",
                                         hint=CORRUPT_HINT) from e
                except Exception as e:
                    raise map_error(e, repo=repo, revision=rev, endpoint=endpoint, token=token,
                                    path=f.path) from e
            return download

        def into_store(f: RemoteFile, local: Path) -> Path:
            return store.add_file(local, expected_sha256=f.sha256, expected_size=f.size,
                                  name=f"{repo}/{f.path}", move=True, hint=CORRUPT_HINT)

        return fetch_into_store(pinned, store, source="modelscope", what=f"{repo}@{rev}", downloader=downloader,
                                into_store=into_store, jobs=jobs, progress=progress)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def map_error(e: BaseException, *, repo: str, revision: str, endpoint: str, token: str | None,
              path: str | None = None) -> LlmPackError:
    where = f"{repo}/{path}" if path else repo
    detail = scrub(_first_line(e), token)
    disk = local_disk_error(e, where)
    if disk is not None:
        return disk
    if isinstance(e, (AuthenticationError, PermissionDeniedError)):
        hint = ("the token in MODELSCOPE_API_TOKEN has no access to this model" if token else
                "the model is private or gated: set MODELSCOPE_API_TOKEN to a token with access to it")
        return AuthError(f"access to {where} at {endpoint} was refused (HTTP {e.status_code})", hint=hint)
    if isinstance(e, NotExistError):
        return NotFoundError(f"{where} not found at {endpoint} (revision {revision})")
    if isinstance(e, FileIntegrityError):
        return SourceError(f"{where}: {detail}", hint=CORRUPT_HINT)
    if isinstance(e, APIError):
        return SourceError(f"{endpoint} answered HTTP {e.status_code} for {where}: {detail}",
                           hint="retry later; if it persists check MODELSCOPE_ENDPOINT / the model's endpoint")
    if isinstance(e, (NetworkError, requests.RequestException, ConnectionError, TimeoutError, HubError, OSError)):
        return SourceError(f"cannot download {where} from {endpoint}: {detail}",
                           hint="check the network, proxy settings and MODELSCOPE_ENDPOINT; completed files "
                           "are kept, re-run to continue")
    return SourceError(f"{where} from {endpoint}: {type(e).__name__}: {detail}")
