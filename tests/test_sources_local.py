"""Local directory source: hashing in place (nothing copied into the store), the stat cache, fetch checks,
patterns, symlinks, registry; and `pack build` hardlinking the operator's files into the bundle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from installer.errors import IntegrityError, UsageError
from packager.errors import NotFoundError, SourceError
from packager.sources import get_source
from packager.sources.base import content_hash, filter_paths
from packager.sources.local import LocalSource
from packager.spec import ModelSpec
from packager.store import ContentStore

ROOT = Path(__file__).resolve().parent.parent


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


def _blobs(store: ContentStore) -> list[Path]:
    return [p for p in (store.root / "sha256").rglob("*") if p.is_file()] if (store.root / "sha256").exists() else []


def _alias_inodes(store: ContentStore) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (store.root / "alias").rglob("*") if p.is_file()}


def test_resolve_hashes_in_place_and_fetch_returns_the_source_files(tmp_path: Path, store: ContentStore) -> None:
    files = _make_model(tmp_path / "m")
    root = (tmp_path / "m").resolve()
    src = get_source("local", store=store)
    pinned = src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m"))
    assert [f.path for f in pinned.files] == sorted(files)  # .git/ and .cache/huggingface/ skipped
    for f in pinned.files:
        assert (f.size, f.sha256) == (len(files[f.path]), _sha(files[f.path]))
    assert pinned.commit == content_hash((p, _sha(d)) for p, d in files.items())
    assert pinned.repo == str(root) and pinned.revision is None
    assert _blobs(store) == [] and not (store.root / "tmp").exists()  # nothing was copied into the store
    got = src.fetch(pinned, store, progress=False)
    assert got == {rel: root / rel for rel in files}  # the operator's own files, not copies
    assert _blobs(store) == []
    # resolving again gives the same pin from the stat cache: no file is hashed (no alias is rewritten)
    aliases = _alias_inodes(store)
    assert len(aliases) == len(files)
    assert src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m")) == pinned
    assert _alias_inodes(store) == aliases
    # changing one byte changes the pin
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "llamb"}')
    assert src.resolve(ModelSpec(name="demo", source="local", path=tmp_path / "m")).commit != pinned.commit


def _rewrite_same_size(path: Path) -> None:
    """Change every byte of ``path`` in place (same inode, same size) and move its mtime on."""
    st = path.stat()
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(bytes(b ^ 0x55 for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size


def test_fetch_catches_a_file_changed_after_resolve(tmp_path: Path, store: ContentStore) -> None:
    files = _make_model(tmp_path / "m")
    pinned = LocalSource(store).resolve(ModelSpec(name="d", source="local", path=tmp_path / "m"))
    _rewrite_same_size(tmp_path / "m" / "model-00002-of-00002.safetensors")
    with pytest.raises(IntegrityError) as ei:
        LocalSource(store).fetch(pinned, store, progress=False)
    assert ei.value.path == f"{pinned.repo}/model-00002-of-00002.safetensors"
    assert ei.value.expected == _sha(files["model-00002-of-00002.safetensors"])
    assert "changed since it was resolved" in str(ei.value)
    # a stat that moved without the bytes changing is re-hashed and accepted
    (tmp_path / "m" / "model-00002-of-00002.safetensors").write_bytes(files["model-00002-of-00002.safetensors"])
    assert LocalSource(store).fetch(pinned, store, progress=False)["config.json"] == Path(pinned.repo) / "config.json"
    # a file that is gone is named
    (tmp_path / "m" / "README.md").unlink()
    with pytest.raises(NotFoundError, match="README.md is gone"):
        LocalSource(store).fetch(pinned, store, progress=False)


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


def test_fetch_with_another_store_rehashes_against_the_pin(tmp_path: Path, store: ContentStore) -> None:
    files = _make_model(tmp_path / "m")
    pinned = LocalSource(store).resolve(ModelSpec(name="d", source="local", path=tmp_path / "m"))
    other = ContentStore(tmp_path / "store2")  # knows no stat: every file is hashed again
    got = LocalSource(other).fetch(pinned, other, progress=False)
    assert {p: b.read_bytes() for p, b in got.items()} == files
    assert len(_alias_inodes(other)) == len(files) and _blobs(other) == []
    third = ContentStore(tmp_path / "store3")
    (tmp_path / "m" / "tokenizer.json").write_bytes(b"x" * len(files["tokenizer.json"]))
    with pytest.raises(IntegrityError) as ei:
        LocalSource(third).fetch(pinned, third, progress=False)
    assert ei.value.path.endswith("/tokenizer.json")


def test_parallel_hashing_large(tmp_path: Path, store: ContentStore) -> None:
    root = tmp_path / "big"
    root.mkdir()
    data = {f"model-{i}.safetensors": os.urandom((8 << 20) + 1) for i in range(4)}
    for rel, d in data.items():
        (root / rel).write_bytes(d)
    os.symlink("model-0.safetensors", root / "same.safetensors")  # one file under two names
    pinned = LocalSource(store, jobs=2).resolve(ModelSpec(name="d", source="local", path=root))
    want = {p: _sha(d) for p, d in data.items()} | {"same.safetensors": _sha(data["model-0.safetensors"])}
    assert {f.path: f.sha256 for f in pinned.files} == want
    assert {f.path: f.sha256 for f in pinned.files} == \
        {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in want}
    assert _blobs(store) == []


# -- `pack build` of a local model: the bundle hardlinks the operator's files ---------------------------------
def _pack(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "LLM_PACK_STORE": str(store)})


def test_pack_build_hardlinks_local_files_and_verify_catches_an_edit_in_place(tmp_path: Path) -> None:
    files = _make_model(tmp_path / "m")
    model = (tmp_path / "m").resolve()
    r = _pack("keygen", "--out", str(tmp_path / "k"), store=tmp_path / "store")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = tmp_path / "b.yaml"
    manifest.write_text(f"bundle: {{name: loc, version: '1'}}\n"
                        f"models:\n  - {{name: m, source: local, path: {model}}}\n")
    r = _pack("build", str(manifest), "--key", f"{tmp_path}/k.key", "--out", str(tmp_path / "out"),
              "--no-progress", store=tmp_path / "store")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"models placed: {len(files)} hardlink" in r.stdout
    bundle = tmp_path / "out" / "loc-1"
    for rel, data in files.items():
        placed = bundle / "models" / "m" / rel
        assert not placed.is_symlink() and placed.stat().st_ino == (model / rel).stat().st_ino
        assert placed.read_bytes() == data
    # the operator's files never enter the store: its only blob is the installer archive (kept for reuse)
    doc = json.loads((bundle / "MANIFEST.json").read_text())
    installer_sha = next(a["sha256"] for a in doc["artifacts"] if a["path"] == "installer.tar.gz")
    assert [b.name for b in _blobs(ContentStore(tmp_path / "store"))] == [installer_sha]
    r = _pack("verify", str(bundle), "--pubkey", f"{tmp_path}/k.pub", store=tmp_path / "store")
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stdout + r.stderr
    # the operator edits a weight file in place: the bundle shares the inode, and verify says so, by name
    _rewrite_same_size(model / "model-00001-of-00002.safetensors")
    r = _pack("verify", str(bundle), "--pubkey", f"{tmp_path}/k.pub", store=tmp_path / "store")
    assert r.returncode != 0
    assert "models/m/model-00001-of-00002.safetensors: sha256 mismatch" in r.stderr, r.stdout + r.stderr
    # building again re-hashes the changed file and produces a bundle that verifies
    r = _pack("build", str(manifest), "--key", f"{tmp_path}/k.key", "--out", str(tmp_path / "out"),
              "--no-progress", store=tmp_path / "store")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _pack("verify", str(bundle), "--pubkey", f"{tmp_path}/k.pub", store=tmp_path / "store")
    assert r.returncode == 0, r.stdout + r.stderr


def test_pack_build_shows_a_hashing_bar_for_a_local_model(tmp_path: Path) -> None:
    files = _make_model(tmp_path / "m")
    manifest = tmp_path / "b.yaml"
    manifest.write_text(f"bundle: {{name: bar, version: '1'}}\n"
                        f"models:\n  - {{name: m, source: local, path: {(tmp_path / 'm').resolve()}}}\n")
    r = _pack("build", str(manifest), "--out", str(tmp_path / "out"), store=tmp_path / "store")
    assert r.returncode == 0, r.stdout + r.stderr
    # one pass over what is signed: the model's files, the installer archive (hardlinked from the store)
    assert f"bar (hashing {len(files) + 1} files to sign): 100%" in r.stderr, r.stderr
    r = _pack("build", str(manifest), "--out", str(tmp_path / "out2"), "--no-progress", store=tmp_path / "s2")
    assert r.returncode == 0 and "hashing" not in r.stderr, r.stderr
