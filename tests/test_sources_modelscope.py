"""ModelScope source: the real modelscope client against the test hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devkit.hub import GeneratedContent, HubServer
from installer.errors import IntegrityError
from packager.errors import AuthError, NotFoundError
from packager.sources import get_source
from packager.sources.base import content_hash
from packager.spec import ModelSpec
from packager.store import ContentStore

pytest_plugins = ("tests.hub.fixtures",)  # fixtures: hub, hub_env

REPO = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
ROOT = Path(__file__).resolve().parents[1]


def _files() -> dict[str, bytes | GeneratedContent]:
    return {
        "config.json": b'{"architectures": ["Qwen2ForCausalLM"]}',
        "configuration.json": b'{"framework": "pytorch"}',
        "tokenizer.json": b'{"model": {}}' * 200,
        "model.safetensors": GeneratedContent(12 << 20, seed="ms"),
        "figures/benchmark.jpg": os.urandom(5000),
        "README.md": b"# model\n",
        "empty.txt": b"",
    }


def _spec(hub: HubServer, **kw) -> ModelSpec:
    return ModelSpec(name="ds", source="modelscope", repo=kw.pop("repo", REPO), endpoint=hub.url, **kw)


def _served(hub: HubServer, path: str) -> bytes:
    return b"".join(hub.file(REPO, path).content.read())


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def test_full_download_sha256_checked(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    src = get_source("modelscope")
    pinned = src.resolve(_spec(hub))
    assert [f.path for f in pinned.files] == sorted(_files())
    assert {f.path: f.sha256 for f in pinned.files} == {p: hub.file(REPO, p).sha256 for p in _files()}
    assert pinned.revision == "master"
    assert pinned.commit == content_hash((f.path, f.sha256) for f in pinned.files)
    blobs = src.fetch(pinned, store, progress=False)
    for path, blob in blobs.items():
        assert blob.read_bytes() == _served(hub, path)
        assert blob.name == hashlib.sha256(_served(hub, path)).hexdigest()
    n = hub.total_downloads()
    assert src.fetch(pinned, store, progress=False) == blobs
    assert hub.total_downloads() == n  # nothing fetched twice


def test_commit_sha_revision_is_pinned_as_is(hub: HubServer, store: ContentStore) -> None:
    sha = hub.add_repo(REPO, _files(), branch="master")
    hub.add_repo(REPO, {"config.json": b"{}"}, branch="master")  # the branch moves on
    src = get_source("modelscope")
    pinned = src.resolve(_spec(hub, revision=sha))
    assert pinned.commit == sha and len(pinned.files) == len(_files())
    src.fetch(pinned, store, progress=False)
    downloads = hub.requests_matching(r"/repo\?")
    assert downloads and all(f"Revision={sha}" in r.path for r in downloads)


def test_what_is_pinned_for_a_branch_and_the_commit_ids_the_hub_lists(hub: HubServer, store: ContentStore) -> None:
    """ModelScope names no commit for a branch: pinned by content, and the per-file commit ids the real client
    reads from the listing (the last commit that changed each file) are kept beside it."""
    first = hub.add_repo(REPO, _files(), branch="master")
    second = hub.add_repo(REPO, {**_files(), "README.md": b"# model, v2\n"}, branch="master")
    src = get_source("modelscope")
    pinned = src.resolve(_spec(hub))
    assert hub.requests_matching(r"/api/v1/models/.*/repo/files\?.*Revision=master")
    assert pinned.pinned_by == "content"
    assert pinned.commit == content_hash((f.path, f.sha256) for f in pinned.files)
    assert pinned.hub_file_commits == tuple(sorted({first, second}))  # README.md changed in the second only
    by_commit = src.resolve(_spec(hub, revision=first))
    assert by_commit.pinned_by == "commit" and by_commit.commit == first
    assert by_commit.hub_file_commits == (first,)
    assert {f.path: f.sha256 for f in by_commit.files}["README.md"] == hashlib.sha256(b"# model\n").hexdigest()
    only = src.resolve(_spec(hub, allow_patterns=("README.md",)))
    assert only.hub_file_commits == (second,)


def test_patterns(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    src = get_source("modelscope")
    pinned = src.resolve(_spec(hub, allow_patterns=("*.json", "*.safetensors"), ignore_patterns=("configuration*",)))
    assert [f.path for f in pinned.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    src.fetch(pinned, store, progress=False)
    assert hub.downloads(REPO, "README.md") == 0 and hub.downloads(REPO, "figures/benchmark.jpg") == 0


def test_unknown_repo_and_revision(hub: HubServer) -> None:
    hub.add_repo(REPO, _files(), branch="master", tags=("v1.0",))
    src = get_source("modelscope")
    with pytest.raises(NotFoundError) as ei:
        src.resolve(_spec(hub, repo="nobody/nothing"))
    assert ei.value.message == f"repository nobody/nothing not found at {hub.url}"
    with pytest.raises(NotFoundError) as ei:
        src.resolve(_spec(hub, revision="v9"))
    assert ei.value.message == f"revision 'v9' of {REPO} not found at {hub.url}"
    assert "master" in ei.value.hint and "v1.0" in ei.value.hint


def test_endpoint_from_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    pinned = get_source("modelscope").resolve(ModelSpec(name="d", source="modelscope", repo=REPO))
    assert pinned.endpoint == hub.url


def test_gated_model_token(hub: HubServer, store: ContentStore, monkeypatch: pytest.MonkeyPatch,
                           caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    good, wrong = "ms-good-0c1d2e3f-secret", "ms-wrong-9a8b7c6d-secret"
    hub.add_repo(REPO, _files(), branch="master", token=good)
    src = get_source("modelscope")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as ei:
        src.resolve(_spec(hub))
    assert "MODELSCOPE_API_TOKEN" in str(ei.value)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", wrong)
    with pytest.raises(AuthError) as ei:
        src.resolve(_spec(hub))
    assert hub.log[-1].headers.get("authorization") == f"Bearer {wrong}"
    out, err = capfd.readouterr()
    for text in (str(ei.value), caplog.text, out, err):
        assert wrong not in text
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", good)
    blobs = src.fetch(src.resolve(_spec(hub)), store, progress=False)
    assert len(blobs) == len(_files())
    out, err = capfd.readouterr()
    assert good not in caplog.text + out + err


def test_corrupted_file_caught_naming_it(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    hub.corrupt(REPO, "model.safetensors")
    src = get_source("modelscope")
    pinned = src.resolve(_spec(hub))
    with pytest.raises(IntegrityError) as ei:
        src.fetch(pinned, store, progress=False)
    assert ei.value.path == f"{REPO}/model.safetensors"
    assert not store.has(hub.file(REPO, "model.safetensors").sha256)
    hub.clear_faults()
    before = {p: hub.downloads(REPO, p) for p in _files()}
    src.fetch(pinned, store, progress=False)
    changed = {p for p in _files() if hub.downloads(REPO, p) != before[p]}
    assert changed == {"model.safetensors"}


def test_corruption_caught_by_the_client_itself_is_reported_the_same(hub_env: Path, store: ContentStore) -> None:
    # a CDN that sends X-Linked-ETag (sha256) makes the client check and retry on its own
    with HubServer(ms_linked_etag=True) as hub:
        hub.add_repo(REPO, _files(), branch="master")
        hub.corrupt(REPO, "model.safetensors")
        src = get_source("modelscope")
        with pytest.raises(IntegrityError) as ei:
            src.fetch(src.resolve(_spec(hub)), store, progress=False)
        assert ei.value.path == f"{REPO}/model.safetensors"
        assert ei.value.expected == hub.file(REPO, "model.safetensors").sha256
        assert hub.downloads(REPO, "model.safetensors") == 3  # the client's own retries


def test_dropped_connection_resumed_in_run(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    hub.drop_connection(REPO, "model.safetensors", after_bytes=(5 << 20) + 77, times=1)
    src = get_source("modelscope")
    blobs = src.fetch(src.resolve(_spec(hub)), store, progress=False)
    assert blobs["model.safetensors"].read_bytes() == _served(hub, "model.safetensors")
    gets = [r for r in hub.requests_matching(r"FilePath=model\.safetensors")]
    assert len(gets) == 2 and "range" not in gets[0].headers
    assert gets[1].headers["range"].startswith("bytes=") and gets[1].status == 206
    assert 0 < int(gets[1].headers["range"][6:-1]) <= (5 << 20) + 77


_FIRST_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from packager.sources import get_source
    from packager.spec import ModelSpec
    from packager.store import ContentStore
    spec = ModelSpec(name="ds", source="modelscope", repo=sys.argv[1], endpoint=sys.argv[2])
    src = get_source("modelscope")
    src.fetch(src.resolve(spec), ContentStore(Path(sys.argv[3])), jobs=3, progress=False)
""")


def test_interrupted_build_resumes_partial_file_and_skips_completed(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files(), branch="master")
    hub.drop_connection(REPO, "model.safetensors", after_bytes=(6 << 20) + 5, times=None)
    # first build: a separate process whose client gives up at once (its documented retry knob)
    env = {**os.environ, "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _FIRST_RUN, REPO, hub.url, str(store.root)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "model.safetensors" in run.stderr
    done = [p for p in _files() if p != "model.safetensors"]
    assert all(store.has(hub.file(REPO, p).sha256) for p in done)
    partial = list(store.tmpdir().rglob("model.safetensors.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    kept = partial[0].stat().st_size
    # second build, the network is fine again: only the rest of the big file is transferred
    hub.clear_faults()
    first = {p: hub.downloads(REPO, p) for p in _files()}
    src = get_source("modelscope")
    blobs = src.fetch(src.resolve(_spec(hub)), store, progress=False)
    assert blobs["model.safetensors"].read_bytes() == _served(hub, "model.safetensors")
    assert all(hub.downloads(REPO, p) == first[p] for p in done)
    last = hub.requests_matching(r"FilePath=model\.safetensors")[-1]
    assert last.headers["range"] == f"bytes={kept}-" and last.status == 206
