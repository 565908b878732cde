"""Hugging Face Hub source, through the real ``huggingface_hub`` client.

resolve: ``HfApi.model_info(repo, revision)`` pins the branch/tag to its commit sha, then
``HfApi.list_repo_tree(repo, revision=<sha>, recursive=True)`` lists every file with its size, git
blob oid and, for LFS files, the sha256 the hub stores.

fetch: ``hf_hub_download(repo, path, revision=<sha>, local_dir=<store tmp>)`` per missing file,
``jobs`` at a time, then our own check and a rename into the content store:

* LFS files: size and the listed sha256 (``huggingface_hub`` does not hash what it downloads over
  plain HTTP, so a corrupted file of the right size would otherwise be accepted).
* non-LFS files (small: configs, tokenizers): the hub lists only a git blob oid (sha1), no sha256. We
  compute the git blob sha1 and the sha256 in one pass, require the size and the git oid to match,
  record the computed sha256 (and remember ``git-sha1:<oid> -> sha256`` in the store so a re-run
  does not fetch the file again). ``RemoteFile.sha256`` is "" for these until ``with_hashes``.

Endpoint: ``spec.endpoint``, else ``$HF_ENDPOINT``, else https://huggingface.co. Token: ``$HF_TOKEN``
(or the legacy ``$HUGGING_FACE_HUB_TOKEN``) only; a token saved by ``hf auth login`` is not used, and
the token is never written anywhere nor shown in a message. The client's own cache is pointed
inside the content store's tmp dir so nothing lands in ``~/.cache/huggingface``.

Resume: a re-run skips files already in the store. Within one run, the client resumes an interrupted
transfer with a Range request (up to 5 times); across runs it does not keep partial files (2.4.0
writes to a per-process temp name and deletes it on failure), so an interrupted big file restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from tqdm import tqdm as _tqdm

from installer.errors import IntegrityError, LlmPackError, UsageError
from packager.errors import AuthError, NotFoundError, SourceError
from packager.hashing import git_blob_sha1_and_sha256
from packager.sources.base import (
    COMMIT_RE,
    PinnedModel,
    RemoteFile,
    check_relative_path,
    env_token,
    fetch_into_store,
    filter_paths,
    local_disk_error,
    scrub,
)
from packager.spec import ModelSpec
from packager.store import ContentStore

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
LIBRARY = "llm-pack"
CORRUPT_HINT = ("the hub served bytes that differ from what it lists; the bad download was discarded, "
                "re-run to fetch it again (if it persists, the endpoint or a proxy is serving corrupt data)")


class _QuietTqdm(_tqdm):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hf_endpoint(spec_endpoint: str | None) -> str:
    return (spec_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


class HuggingFaceSource:
    name = "huggingface"

    def resolve(self, spec: ModelSpec) -> PinnedModel:
        if not spec.repo:
            raise UsageError(f"model {spec.name}: source huggingface needs `repo: org/name`")
        endpoint = hf_endpoint(spec.endpoint)
        token = env_token(*TOKEN_VARS)
        rev = spec.revision or "main"
        api = HfApi(endpoint=endpoint, token=token or False, library_name=LIBRARY)
        try:
            info = api.model_info(spec.repo, revision=rev)
            commit = info.sha or ""
            if not COMMIT_RE.fullmatch(commit):
                raise SourceError(f"{endpoint} returned no commit sha for {spec.repo}@{rev} (got {commit!r})",
                                  hint="is HF_ENDPOINT / endpoint a Hugging Face compatible hub?")
            entries = list(api.list_repo_tree(spec.repo, revision=commit, recursive=True))
        except LlmPackError:
            raise
        except Exception as e:
            raise map_error(e, repo=spec.repo, revision=rev, endpoint=endpoint, token=token) from e
        files = []
        for e in entries:
            if not isinstance(e, RepoFile):
                continue
            path = check_relative_path(e.path, f"{spec.repo}@{commit}")
            if e.lfs is not None:
                files.append(RemoteFile(path, int(e.lfs.size), e.lfs.sha256.lower(), e.blob_id))
            else:
                files.append(RemoteFile(path, int(e.size), "", e.blob_id))
        kept = filter_paths(files, spec.allow_patterns, spec.ignore_patterns, key=lambda f: f.path)
        if not kept:
            raise NotFoundError(
                f"model {spec.name}: no file of {spec.repo}@{commit[:12]} matches allow_patterns "
                f"{list(spec.allow_patterns)} / ignore_patterns {list(spec.ignore_patterns)}",
                hint=f"the repo has: {', '.join(f.path for f in files[:12])}" if files else None)
        return PinnedModel(name=spec.name, source=self.name, repo=spec.repo, revision=rev, commit=commit,
                           endpoint=endpoint, files=tuple(sorted(kept, key=lambda f: f.path)))

    def fetch(self, pinned: PinnedModel, store: ContentStore, *, jobs: int = 4,
              progress: bool = True) -> dict[str, Path]:
        repo = pinned.repo or ""
        endpoint = pinned.endpoint or hf_endpoint(None)
        token = env_token(*TOKEN_VARS)

        def known_sha(f: RemoteFile) -> str | None:
            return f.sha256 or (store.lookup_alias("git-sha1", f.git_oid) if f.git_oid else None)

        def downloader(work: Path, cache_dir: Path):
            def download(f: RemoteFile) -> Path:
                try:
                    return Path(hf_hub_download(
                        repo, f.path, revision=pinned.commit, local_dir=work, cache_dir=cache_dir,
                        endpoint=endpoint, token=token or False, library_name=LIBRARY,
                        tqdm_class=None if progress else _QuietTqdm))
                except Exception as e:
                    raise map_error(e, repo=repo, revision=pinned.commit, endpoint=endpoint, token=token,
                                    path=f.path) from e
            return download

        return fetch_into_store(
            pinned, store, source="huggingface", what=f"{repo}@{pinned.commit[:12]}", downloader=downloader,
            into_store=lambda f, local: _verify_into_store(f, local, store, f"{repo}/{f.path}"),
            known_sha=known_sha, jobs=jobs, progress=progress)


def _verify_into_store(f: RemoteFile, local: Path, store: ContentStore, name: str) -> Path:
    if f.sha256:
        return store.add_file(local, expected_sha256=f.sha256, expected_size=f.size, name=name, move=True,
                              hint=CORRUPT_HINT)
    oid, sha, size = git_blob_sha1_and_sha256(local)
    if size != f.size:
        raise IntegrityError(name, expected=f"{f.size} bytes", actual=f"{size} bytes", what="size",
                             hint=CORRUPT_HINT)
    if f.git_oid and oid != f.git_oid:
        raise IntegrityError(name, expected=f.git_oid, actual=oid, what="git blob sha1", hint=CORRUPT_HINT)
    blob = store.add_file(local, expected_sha256=sha, expected_size=size, name=name, move=True,
                          hint=CORRUPT_HINT)
    store.record_alias("git-sha1", oid, sha)
    return blob


def map_error(e: BaseException, *, repo: str, revision: str, endpoint: str, token: str | None,
              path: str | None = None) -> LlmPackError:
    """Turn a huggingface_hub / httpx error into ours. The token never appears in the message."""
    where = f"{repo}/{path}" if path else repo
    disk = local_disk_error(e, where)
    if disk is not None:
        return disk
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)
                                         and not isinstance(e, RepositoryNotFoundError)):
        if token:
            hint = ("the token in HF_TOKEN has no access to this repository: request access on its page "
                    "(gated models) or use a token of an account that has access")
        else:
            hint = "the repository is gated or private: set HF_TOKEN to a token with access to it"
        return AuthError(f"access to {where} at {endpoint} was refused (HTTP {status}: gated or private "
                         "repository)", hint=hint)
    if isinstance(e, RevisionNotFoundError):
        return NotFoundError(f"revision {revision!r} of {repo} not found at {endpoint}",
                             hint="use a branch, tag or full commit sha that exists in the repository")
    if isinstance(e, RepositoryNotFoundError):
        return NotFoundError(f"repository {repo} not found at {endpoint}",
                             hint="check the repo id (org/name); a private repository also looks missing "
                             "without a token: set HF_TOKEN")
    if isinstance(e, RemoteEntryNotFoundError):
        return NotFoundError(f"{where} not found at {endpoint} (revision {revision})")
    if isinstance(e, OfflineModeIsEnabled):
        return SourceError(f"cannot fetch {where}: huggingface_hub is in offline mode",
                           hint="unset HF_HUB_OFFLINE on the build host")
    if isinstance(e, HfHubHTTPError):
        return SourceError(f"{endpoint} answered HTTP {status} for {where}: "
                           f"{scrub(str(e).strip().splitlines()[0] if str(e).strip() else '', token)}",
                           hint="retry later; if it persists check HF_ENDPOINT / the model's endpoint")
    if isinstance(e, (httpx2.HTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError)):
        cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
        detail = scrub(str(cause) or type(cause).__name__, token)
        return SourceError(f"cannot download {where} from {endpoint}: {detail}",
                           hint="check the network, proxy settings and HF_ENDPOINT (or the model's "
                           "`endpoint:` for a mirror); completed files are kept, re-run to continue")
    return SourceError(f"{where} from {endpoint}: {type(e).__name__}: {scrub(str(e), token)}")
