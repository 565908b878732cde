"""Local directory source: patterns, hashing while copying into the store, symlinks, registry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from installer.errors import IntegrityError, NotFoundError, SourceError, UsageError
from packager.hashing import PARALLEL_MIN_BYTES
from packager.sources import get_source
from packager.sources.base import content_hash, filter_paths
from packager.sources.local import LocalSource
from packager.spec import ModelSpec
from packager.store import ContentStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_model(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b'{"version": "1.0"}' * 50,
        "model-00001-of-00002.safetensors": os.urandom(300_000),
        "model-00002-of-00002.safetensors": os.urandom(200_000),
        "README.md": b"# demo\n",
        "original/consolidated.pth": os.urandom(1000),
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".git" / "lfs").mkdir(parents=True)
    (root / ".git" / "lfs" / "object").write_bytes(b"not part of the model")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.metadata").write_text("client state")
    return files


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def test_resolve_hashes_while_copying_into_store(tmp_path: Path, store: ContentStore) -> None:
    files = _make_model(tmp_path / "m")
    src = get_source("local", store=store)
    pinned = src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m"))
    assert [f.path for f in pinned.files] == sorted(files)  # .git/ and .cache/huggingface/ skipped
    for f in pinned.files:
        assert (f.size, f.sha256) == (len(files[f.path]), _sha(files[f.path]))
        assert store.blob(f.sha256).read_bytes() == files[f.path]
    assert pinned.commit == content_hash((p, _sha(d)) for p, d in files.items())
    assert pinned.repo == str((tmp_path / "m").resolve()) and pinned.revision is None
    blobs = src.fetch(pinned, store, progress=False)
    assert {p: b.read_bytes() for p, b in blobs.items()} == files
    # resolving again gives the same pin; changing one byte changes it
    assert src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m")) == pinned
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "llamb"}')
    assert src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m")).commit != pinned.commit


def test_patterns(tmp_path: Path, store: ContentStore) -> None:
    _make_model(tmp_path / "m")
    spec = ModelSpec(name="demo", source="local", path=tmp_path / "m",
                     allow_patterns=("*.json", "*.safetensors", "original/"),
                     ignore_patterns=("*-00002-of-*", "tokenizer*"))
    pinned = LocalSource(store).resolve(spec)
    assert [f.path for f in pinned.files] == ["config.json", "model-00001-of-00002.safetensors",
                                              "original/consolidated.pth"]
    with pytest.raises(NotFoundError, match="no file"):
        LocalSource(store).resolve(ModelSpec(name="d", source="local", path=tmp_path / "m",
                                             allow_patterns=("*.gguf",)))


@pytest.mark.parametrize("allow,ignore", [
    ((), ()), (("*.json",), ()), ((), ("*.md", ".*")), (("sub/",), ()), (("*/*.bin",), ("sub/deep/*",)),
    (("model-*",), ("*.pth",)), (("*",), ("sub/*",)),
])
def test_filter_matches_huggingface_hub(allow: tuple[str, ...], ignore: tuple[str, ...]) -> None:
    paths = ["config.json", "README.md", ".gitattributes", "model-1.safetensors", "sub/a.bin", "sub/deep/b.bin",
             "sub/c.json", "x.pth", "other/sub/d.bin"]
    want = list(filter_repo_objects(paths, allow_patterns=list(allow) or None, ignore_patterns=list(ignore) or None))
    assert filter_paths(paths, allow, ignore) == want


def test_symlinks_inside_followed_outside_refused(tmp_path: Path, store: ContentStore) -> None:
    root = tmp_path / "m"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "w.safetensors").write_bytes(b"W" * 5000)
    (root / "config.json").write_text("{}")
    os.symlink("weights/w.safetensors", root / "model.safetensors")  # file link, inside
    os.symlink("weights", root / "alias")  # directory link, inside
    os.symlink("..", root / "weights" / "up")  # loops back to the root: must not recurse forever
    pinned = LocalSource(store).resolve(ModelSpec(name="d", source="local", path=root))
    paths = [f.path for f in pinned.files]
    assert "model.safetensors" in paths and "alias/w.safetensors" in paths
    assert {f.sha256 for f in pinned.files if f.path.endswith("w.safetensors")} == {_sha(b"W" * 5000)}
    # a link that leaves the directory is an error naming it
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", root / "leak.txt")
    with pytest.raises(SourceError, match="leak.txt is a symlink .* outside"):
        LocalSource(store).resolve(ModelSpec(name="d", source="local", path=root))


def test_hub_cache_snapshot_refused(tmp_path: Path, store: ContentStore) -> None:
    snap = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "abc").write_text("{}")
    os.symlink("../../blobs/abc", snap / "config.json")
    with pytest.raises(SourceError, match="outside") as ei:
        LocalSource(store).resolve(ModelSpec(name="d", source="local", path=snap))
    assert "--local-dir" in str(ei.value)


def test_git_lfs_pointer_refused(tmp_path: Path, store: ContentStore) -> None:
    root = tmp_path / "clone"
    root.mkdir()
    (root / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    with pytest.raises(SourceError, match="git-lfs pointer") as ei:
        LocalSource(store).resolve(ModelSpec(name="d", source="local", path=root))
    assert "git lfs pull" in str(ei.value)


def test_missing_dir_and_usage(tmp_path: Path, store: ContentStore) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        LocalSource(store).resolve(ModelSpec(name="d", source="local", path=tmp_path / "nope"))
    with pytest.raises(UsageError):
        LocalSource(store).resolve(ModelSpec(name="d", source="local"))
    with pytest.raises(UsageError, match="unknown model source"):
        get_source("s3")


def test_fetch_into_other_store_verifies_against_the_pin(tmp_path: Path, store: ContentStore) -> None:
    files = _make_model(tmp_path / "m")
    pinned = LocalSource(store).resolve(ModelSpec(name="d", source="local", path=tmp_path / "m"))
    other = ContentStore(tmp_path / "store2")
    blobs = LocalSource(other).fetch(pinned, other, progress=False)
    assert {p: b.read_bytes() for p, b in blobs.items()} == files
    assert all(str(b).startswith(str(other.root)) for b in blobs.values())
    # a file that changed since resolve is caught, named
    third = ContentStore(tmp_path / "store3")
    (tmp_path / "m" / "tokenizer.json").write_bytes(b"x" * len(files["tokenizer.json"]))
    with pytest.raises(IntegrityError) as ei:
        LocalSource(third).fetch(pinned, third, progress=False)
    assert ei.value.path == "tokenizer.json"
    assert third.has(_sha(files["config.json"]))  # the others were still copied


def test_parallel_ingest_large(tmp_path: Path, store: ContentStore) -> None:
    root = tmp_path / "big"
    root.mkdir()
    data = {f"model-{i}.safetensors": os.urandom(PARALLEL_MIN_BYTES // 3 + 1) for i in range(4)}
    for rel, d in data.items():
        (root / rel).write_bytes(d)
    pinned = LocalSource(store, jobs=2).resolve(ModelSpec(name="d", source="local", path=root))
    assert {f.path: f.sha256 for f in pinned.files} == {p: _sha(d) for p, d in data.items()}
    assert all(store.blob(_sha(d)).read_bytes() == d for d in data.values())
