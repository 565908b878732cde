"""Hugging Face source: the real huggingface_hub client against the test hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import pytest

from devkit.hub import GeneratedContent, HubServer
from installer.errors import IntegrityError
from packager.errors import AuthError, NotFoundError, SourceError
from packager.sources import get_source
from packager.spec import ModelSpec
from packager.store import ContentStore

pytest_plugins = ("tests.hub.fixtures",)  # fixtures: hub, hub_env

REPO = "org/tiny"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(seed: str = "a") -> dict[str, bytes | GeneratedContent]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"], "seed": "%s"}' % seed.encode(),
        "tokenizer.json": b'{"model": {"vocab": {}}}' * 100,  # > 1 KiB: LFS on the test hub
        "generation_config.json": b"{}\n",
        "model.safetensors": GeneratedContent(6 << 20, seed=seed),
        "README.md": b"# tiny\n",
        "empty.txt": b"",
        "sub/extra.bin": os.urandom(3000),
    }


def _spec(hub: HubServer, **kw) -> ModelSpec:
    return ModelSpec(name="tiny", source="huggingface", repo=kw.pop("repo", REPO), endpoint=hub.url, **kw)


def _served_bytes(hub: HubServer, path: str, rev: str | None = None) -> bytes:
    return b"".join(hub.file(REPO, path, rev).content.read())


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def test_branch_pinned_to_sha_and_fetched_verified(hub: HubServer, store: ContentStore) -> None:
    old = hub.add_repo(REPO, _files("a"), tags=("v1.0",))
    new = hub.add_repo(REPO, _files("b"))
    src = get_source("huggingface")
    pinned = src.resolve(_spec(hub))
    assert pinned.commit == new and pinned.revision == "main" and pinned.endpoint == hub.url
    assert src.resolve(_spec(hub, revision="v1.0")).commit == old
    assert src.resolve(_spec(hub, revision=old)).commit == old
    # the download URLs use the commit, not the branch
    blobs = src.fetch(pinned, store, progress=False)
    resolves = [r.path for r in hub.requests_matching(r"/resolve/")]
    assert resolves and all(f"/resolve/{new}/" in p for p in resolves)
    assert sorted(blobs) == sorted(_files())
    for path, blob in blobs.items():
        assert blob.read_bytes() == _served_bytes(hub, path) and not blob.is_symlink()
    # LFS files carry the hub's sha256 from resolve; non-LFS ones get it after fetch
    by_path = {f.path: f for f in pinned.files}
    assert by_path["model.safetensors"].sha256 == hub.file(REPO, "model.safetensors").sha256
    assert by_path["config.json"].sha256 == "" and by_path["config.json"].git_oid
    full = pinned.with_hashes(blobs)
    assert {f.path: f.sha256 for f in full.files} == {p: _sha(_served_bytes(hub, p)) for p in blobs}
    # a second fetch downloads nothing at all, non-LFS files included
    before = hub.total_downloads()
    assert src.fetch(pinned, store, progress=False) == blobs
    assert hub.total_downloads() == before


def test_allow_and_ignore_patterns(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files())
    src = get_source("huggingface")
    pinned = src.resolve(_spec(hub, allow_patterns=("*.json", "*.safetensors", "sub/"),
                               ignore_patterns=("generation_*",)))
    assert [f.path for f in pinned.files] == ["config.json", "model.safetensors", "sub/extra.bin",
                                              "tokenizer.json"]
    src.fetch(pinned, store, progress=False)
    assert hub.downloads(REPO, "README.md") == 0 and hub.downloads(REPO, "generation_config.json") == 0
    with pytest.raises(NotFoundError, match="no file of org/tiny"):
        src.resolve(_spec(hub, allow_patterns=("*.gguf",)))


def test_unknown_repo_and_revision(hub: HubServer) -> None:
    hub.add_repo(REPO, _files())
    src = get_source("huggingface")
    with pytest.raises(NotFoundError) as ei:
        src.resolve(_spec(hub, repo="org/nope"))
    assert ei.value.message == f"repository org/nope not found at {hub.url}"
    with pytest.raises(NotFoundError) as ei:
        src.resolve(_spec(hub, revision="no-such-branch"))
    assert ei.value.message == f"revision 'no-such-branch' of {REPO} not found at {hub.url}"


def test_endpoint_from_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hub.add_repo(REPO, _files())
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    pinned = get_source("huggingface").resolve(ModelSpec(name="t", source="huggingface", repo=REPO))
    assert (pinned.commit, pinned.endpoint) == (sha, hub.url)


def test_gated_repo_needs_token_and_never_leaks_it(hub: HubServer, store: ContentStore,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    good, wrong = "hf_GoodSecretToken1234567890", "hf_WrongSecretToken0987654321"
    hub.add_repo(REPO, _files(), token=good)
    src = get_source("huggingface")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as ei:
        src.resolve(_spec(hub))
    assert "refused (HTTP 401" in str(ei.value) and "set HF_TOKEN" in str(ei.value)

    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(AuthError) as ei:
        src.resolve(_spec(hub))
    assert "HTTP 403" in str(ei.value) and "no access" in str(ei.value)
    assert hub.log[-1].headers.get("authorization") == f"Bearer {wrong}"  # it was really sent
    out, err = capfd.readouterr()
    for text in (str(ei.value), repr(ei.value.args), caplog.text, out, err):
        assert wrong not in text

    monkeypatch.setenv("HF_TOKEN", good)
    pinned = src.resolve(_spec(hub))
    blobs = src.fetch(pinned, store, progress=False)
    assert len(blobs) == len(_files())
    out, err = capfd.readouterr()
    assert good not in caplog.text + out + err
    # nothing under the store (client metadata included) holds the token
    for p in store.root.rglob("*"):
        if p.is_file() and p.stat().st_size < 1 << 20:
            assert good.encode() not in p.read_bytes(), p


def test_corrupted_lfs_file_is_caught_naming_it(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files())
    hub.corrupt(REPO, "model.safetensors")  # same size, one byte flipped, every time
    src = get_source("huggingface")
    pinned = src.resolve(_spec(hub))
    with pytest.raises(IntegrityError) as ei:
        src.fetch(pinned, store, progress=False)
    assert ei.value.path == "org/tiny/model.safetensors" and ei.value.what == "sha256"
    assert "org/tiny/model.safetensors: sha256 mismatch" in str(ei.value)
    assert not store.has(hub.file(REPO, "model.safetensors").sha256)
    assert store.has(hub.file(REPO, "tokenizer.json").sha256)  # the good files were kept
    # once the hub serves the right bytes, only the bad file is fetched again
    hub.clear_faults()
    before = {p: hub.downloads(REPO, p) for p in _files()}
    blobs = src.fetch(pinned, store, progress=False)
    assert blobs["model.safetensors"].read_bytes() == _served_bytes(hub, "model.safetensors")
    after = {p: hub.downloads(REPO, p) for p in _files()}
    assert {p for p in after if after[p] != before[p]} == {"model.safetensors"}


def test_corrupted_small_file_fails_git_oid_check(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files())
    hub.corrupt(REPO, "config.json")
    src = get_source("huggingface")
    with pytest.raises(IntegrityError) as ei:
        src.fetch(src.resolve(_spec(hub)), store, progress=False)
    assert ei.value.path == "org/tiny/config.json" and ei.value.what == "git blob sha1"


def test_dropped_connection_is_resumed_with_range(hub: HubServer, store: ContentStore) -> None:
    # huggingface_hub 2.4.0 writes in 10 MiB chunks and resumes from the last complete chunk
    hub.add_repo(REPO, {**_files(), "model.safetensors": GeneratedContent(24 << 20)})
    hub.drop_connection(REPO, "model.safetensors", after_bytes=(12 << 20) + 123, times=1)
    src = get_source("huggingface")
    blobs = src.fetch(src.resolve(_spec(hub)), store, progress=False)
    assert blobs["model.safetensors"].read_bytes() == _served_bytes(hub, "model.safetensors")
    gets = [r for r in hub.requests_matching(r"/resolve/.*/model\.safetensors$") if r.method == "GET"]
    assert len(gets) == 2
    assert "range" not in gets[0].headers and gets[1].headers["range"] == f"bytes={10 << 20}-"
    assert gets[1].status == 206


def test_interrupted_run_then_rerun_fetches_only_what_is_missing(hub: HubServer, store: ContentStore) -> None:
    hub.add_repo(REPO, _files())
    # the connection keeps dropping for one file: the client gives up after its retries
    hub.drop_connection(REPO, "model.safetensors", after_bytes=1 << 20, times=None)
    src = get_source("huggingface")
    pinned = src.resolve(_spec(hub))
    with pytest.raises(SourceError) as ei:
        src.fetch(pinned, store, jobs=3, progress=False)
    assert "org/tiny/model.safetensors" in str(ei.value)
    done = {p for p in _files() if p != "model.safetensors"}
    first = {p: hub.downloads(REPO, p) for p in _files()}
    # (the client never GETs an empty file: HEAD said 0 bytes)
    assert all(first[p] == (0 if p == "empty.txt" else 1) for p in done)
    hub.clear_faults()
    blobs = src.fetch(pinned, store, jobs=3, progress=False)
    assert sorted(blobs) == sorted(_files())
    second = {p: hub.downloads(REPO, p) for p in _files()}
    assert all(second[p] == first[p] for p in done)  # completed files were not fetched again
    assert second["model.safetensors"] == first["model.safetensors"] + 1
    # and a third run touches nothing on the hub's file routes
    n = len(hub.log)
    src.fetch(pinned, store, progress=False)
    assert len(hub.log) == n


def test_unreachable_endpoint(hub_env: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ModelSpec(name="t", source="huggingface", repo=REPO, endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(SourceError) as ei:
        get_source("huggingface").resolve(spec)
    assert f"127.0.0.1:{port}" in str(ei.value) and "HF_ENDPOINT" in str(ei.value)


def test_serve_model_dir(hub: HubServer, store: ContentStore, tmp_path: Path) -> None:
    model = tmp_path / "demo"
    (model / "nested").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(os.urandom(50_000))
    (model / "nested" / "t.txt").write_text("x")
    sha = hub.add_repo_from_dir("demo/tiny", model)
    src = get_source("huggingface")
    pinned = src.resolve(ModelSpec(name="d", source="huggingface", repo="demo/tiny", endpoint=hub.url))
    assert pinned.commit == sha
    blobs = src.fetch(pinned, store, progress=False)
    assert {p: b.read_bytes() for p, b in blobs.items()} == {
        p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    dest = tmp_path / "bundle" / "model.safetensors"
    store.link_into(blobs["model.safetensors"].name, dest)
    assert not dest.is_symlink() and dest.read_bytes() == (model / "model.safetensors").read_bytes()
