"""Packing a real environment: tar.zst with conda-pack's relocation semantics, unpacked elsewhere and run;
the pack cache; the installer runtime cut from the env."""
# ruff: noqa: F811  (pytest fixtures imported from tests.conda.fixtures are redefined as parameters)

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from installer.errors import EnvironmentBuildError
from packager.envpack import cached_pack, cut_runtime, pack_env
from packager.envs import build_env, inspect_env
from packager.spec import EnvSpec, PipSpec
from tests.conda.fixtures import (  # noqa: F401  (fixtures)
    TARGET,
    built_env,
    conda_channel,
    env_spec,
    env_work,
    wheel_dir,
)

pytestmark = pytest.mark.timeout(600)


def unpack(archive: Path, dest: Path) -> None:
    """What the installer does on the target: stream-decompress, extract with tarfile's data filter."""
    dest.mkdir(parents=True)
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            t.extractall(dest, filter="data")


def run(*cmd, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True, env={}, **kw).stdout


@pytest.fixture(scope="module")
def packed(built_env, tmp_path_factory):
    return pack_env(built_env, tmp_path_factory.mktemp("packed") / "t1.tar.zst")


@pytest.fixture(scope="module")
def unpacked(packed, built_env, tmp_path_factory) -> Path:
    """Unpacked at a different and longer path, then conda-unpack run with the env's own python."""
    dest = tmp_path_factory.mktemp("target") / "opt" / "llm" / "envs" / "t1" / ("0123456789abcdef" * 3) / "env"
    assert len(str(dest)) > len(str(built_env.prefix))
    unpack(packed.path, dest)
    run(dest / "bin" / "python", dest / "bin" / "conda-unpack")
    return dest


def test_pack_result_describes_the_archive(packed):
    data = packed.path.read_bytes()
    assert packed.size == len(data)
    assert packed.sha256 == hashlib.sha256(data).hexdigest()
    with open(packed.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            members = list(t)
    assert packed.files == len(members)
    assert packed.unpacked_size == sum(m.size for m in members if m.isfile())
    assert not [p for p in packed.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_archive_is_deterministic_and_normalised(packed, built_env, tmp_path):
    again = pack_env(built_env, tmp_path / "again.tar.zst", threads=1)
    assert again.sha256 == packed.sha256  # same bytes whatever the thread count
    with open(packed.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            members = list(t)
    names = [m.name for m in members]
    generated = ["bin/activate", "bin/activate.fish", "bin/conda-unpack", "bin/conda_unpack_progress.py",
                 "bin/deactivate"]
    assert names[-5:] == generated  # conda-pack's files come last, sorted
    assert names[:-5] == sorted(names[:-5])
    assert len(set(names)) == len(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert all(m.mode in (0o644, 0o755) for m in members if m.isfile())
    assert "CACHEDIR.TAG" not in names
    links = {m.name: m.linkname for m in members if m.issym()}
    assert links["bin/python"] == "python3.11"
    assert not any(m.islnk() for m in members)


def test_text_and_binary_prefixes_are_rewritten(unpacked, built_env):
    old = str(built_env.prefix)
    text = (unpacked / "share" / "llmtest" / "prefix.txt").read_text()
    assert text == f"prefix={unpacked}\n"
    ini = (unpacked / "etc" / "llmtest" / "config.ini").read_text()
    assert f"data = {unpacked}/share/llmtest" in ini and old not in ini
    # the compiled binary holds the prefix in a C string (binary placeholder, NUL-padded)
    assert run(unpacked / "bin" / "llmtest-prefix") == f"prefix={unpacked}\n"
    binary = (unpacked / "bin" / "llmtest-prefix").read_bytes()
    assert str(unpacked).encode() in binary and b"placehold" not in binary
    # python's own text placeholders (sysconfig data)
    assert run(unpacked / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_config_var('prefix'))") \
        == f"{unpacked}\n"


def test_env_python_runs_relocated_with_pip_files(unpacked):
    out = run(unpacked / "bin" / "python", "-c", "import sys, llmtest_hello; print(sys.prefix); llmtest_hello.hi()",
              cwd="/")
    assert out == f"{unpacked}\nhi\n"
    # pip's console script: conda-pack rewrote its shebang; runs with the env's bin first on PATH
    script = (unpacked / "bin" / "llmtest-hello").read_text()
    assert script.startswith("#!/usr/bin/env python")
    assert subprocess.run([str(unpacked / "bin" / "llmtest-hello")], capture_output=True, text=True, check=True,
                          env={"PATH": f"{unpacked}/bin:/usr/bin:/bin"}).stdout == "hi\n"
    pip = run(unpacked / "bin" / "python", "-m", "pip", "--version")
    assert f"{unpacked}/lib/python3.11/site-packages/pip" in pip
    assert (unpacked / "share" / "vllm-kernels" / "done.txt").is_file()  # downloaded at build time, shipped


def test_conda_unpack_records_only_files_that_hold_the_prefix(unpacked):
    script = (unpacked / "bin" / "conda-unpack").read_text()
    assert "'share/llmtest/prefix.txt'" in script and "'bin/llmtest-prefix'" in script
    assert "llmtest_hello/__init__.py" not in script  # pip text file without the build prefix: no record


def test_cached_pack_reuses_the_archive_while_the_lock_is_unchanged(built_env, conda_channel, wheel_dir,
                                                                    tmp_path):
    cache = tmp_path / "packed"
    first = cached_pack(built_env, cache)
    assert not first.reused and first.path.name == f"t1-{built_env.content_hash[:16]}.tar.zst"
    # a rebuild of the same manifest: same lock, same content hash -> the packed env is reused
    rebuilt = build_env(env_spec("t1", conda_channel, wheel_dir), TARGET, tmp_path / "work", progress=False)
    assert rebuilt.content_hash == built_env.content_hash
    second = cached_pack(rebuilt, cache)
    assert second.reused and (second.path, second.sha256, second.size) == (first.path, first.sha256, first.size)
    assert hashlib.sha256(second.path.read_bytes()).hexdigest() == second.sha256
    # a damaged cache entry (size changed) is packed again
    with open(first.path, "ab") as f:
        f.write(b"x")
    third = cached_pack(rebuilt, cache)
    assert not third.reused and third.sha256 == hashlib.sha256(third.path.read_bytes()).hexdigest()
    assert cached_pack(rebuilt, cache).reused
    # another lock -> another archive; the old one is dropped
    other = build_env(env_spec("t1", conda_channel, wheel_dir, cuda="12.4"), TARGET, tmp_path / "w2", progress=False)
    fourth = cached_pack(other, cache)
    assert not fourth.reused and fourth.path != first.path
    assert sorted(p.name for p in cache.iterdir()) == sorted([fourth.path.name, fourth.path.with_suffix("")
                                                              .with_suffix(".json").name])


def test_prefix_form_packs_an_env_built_by_hand(built_env, tmp_path):
    by_hand = tmp_path / "handmade"
    shutil.copytree(built_env.prefix, by_hand, symlinks=True)
    b = inspect_env(EnvSpec(name="hand", prefix=by_hand), TARGET)
    res = pack_env(b, tmp_path / "hand.tar.zst")
    dest = tmp_path / "elsewhere" / "deeper" / "hand"
    unpack(res.path, dest)
    run(dest / "bin" / "python", dest / "bin" / "conda-unpack")
    assert run(dest / "bin" / "llmtest-prefix") == f"prefix={dest}\n"
    assert run(dest / "bin" / "python", "-c", "import sys, llmtest_hello; print(sys.prefix)") == f"{dest}\n"


def test_absolute_symlinks_are_made_relative_and_escaping_ones_refused(built_env, tmp_path):
    prefix = tmp_path / "links"
    shutil.copytree(built_env.prefix, prefix, symlinks=True)
    os.symlink(prefix / "share" / "llmtest" / "prefix.txt", prefix / "share" / "abs-link")
    b = inspect_env(EnvSpec(name="links", prefix=prefix), TARGET)
    res = pack_env(b, tmp_path / "links.tar.zst")
    with open(res.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            links = {m.name: m.linkname for m in t if m.issym()}
    assert links["share/abs-link"] == "llmtest/prefix.txt"
    os.symlink("/etc/passwd", prefix / "share" / "escape")
    with pytest.raises(EnvironmentBuildError, match=r"share/escape is a symlink to /etc/passwd, outside"):
        pack_env(b, tmp_path / "bad.tar.zst")
    assert not list(tmp_path.glob("*bad.tar.zst*"))  # no partial archive left behind


def test_conda_pack_trap_pip_deleted_conda_files(built_env, tmp_path):
    prefix = tmp_path / "clobbered"
    shutil.copytree(built_env.prefix, prefix, symlinks=True)
    b = inspect_env(EnvSpec(name="clob", prefix=prefix), TARGET)
    (prefix / "etc" / "llmtest" / "config.ini").unlink()
    with pytest.raises(EnvironmentBuildError, match=r"conda-pack refuses(.|\n)*llmtest-text 1\.0") as ei:
        pack_env(b, tmp_path / "clob.tar.zst")
    assert "not both" in ei.value.hint


def test_runtime_runs_relocated_and_unpacks_the_env(built_env, packed, tmp_path):
    rt = cut_runtime(built_env, tmp_path / "runtime" / "t1.tar.gz")
    assert rt.sha256 == hashlib.sha256(rt.path.read_bytes()).hexdigest()
    assert cut_runtime(built_env, tmp_path / "again.tar.gz").sha256 == rt.sha256  # deterministic
    with tarfile.open(rt.path, "r:gz") as t:
        names = t.getnames()
        assert all(m.mtime == 0 and m.uid == 0 for m in t.getmembers())
    assert "bin/python3.11" in names and "lib/python3.11/os.py" in names
    assert "lib/python3.11/site-packages/zstandard/__init__.py" in names  # pip --target: the env lacks it
    assert "lib/libpython3.11.so.1.0" in names  # a shared lib the interpreter needs, from the env
    assert not [n for n in names if "/test/" in n or "/tests/" in n or "idlelib" in n or "tkinter" in n
                or "ensurepip" in n or n.endswith(".pyc")]
    root = tmp_path / "bootstrap" / "some" / "dir"
    root.mkdir(parents=True)
    with tarfile.open(rt.path, "r:gz") as t:
        t.extractall(root, filter="data")
    py = root / "bin" / "python3.11"
    for flags in (["-I"], ["-E", "-s"]):
        assert run(py, *flags, "-c", "import sys, zstandard, json, hashlib, tarfile; print(sys.prefix)",
                   cwd="/") == f"{root}\n"
    # what install.sh will do with it: stream-unpack the env archive with this python + zstandard
    dest = tmp_path / "env-by-runtime"
    code = ("import sys, tarfile, zstandard\n"
            "with open(sys.argv[1], 'rb') as f, zstandard.ZstdDecompressor().stream_reader(f) as z:\n"
            "    tarfile.open(fileobj=z, mode='r|').extractall(sys.argv[2], filter='data')\n")
    run(py, "-I", "-c", code, packed.path, dest, cwd="/")
    run(dest / "bin" / "python", dest / "bin" / "conda-unpack")
    assert run(dest / "bin" / "llmtest-prefix") == f"prefix={dest}\n"


def test_prefix_form_without_package_cache_keeps_binary_placeholders(conda_channel, wheel_dir, tmp_path):
    """After `conda clean`, conda-pack cannot read info/paths.json: placeholders come from conda-meta and the
    binary gets its NUL-padded package placeholder back, so it relocates to a longer path."""
    import json

    spec = env_spec("cleaned", conda_channel, wheel_dir, pip=PipSpec(), conda=("llmtest-bin", "llmtest-text"),
                    cuda=None)
    built = build_env(spec, TARGET, tmp_path / "work", progress=False)
    for meta in (built.prefix / "conda-meta").glob("*.json"):
        doc = json.loads(meta.read_text())
        doc["link"]["source"] = str(tmp_path / "gone" / meta.stem)
        meta.write_text(json.dumps(doc))
    b = inspect_env(EnvSpec(name="cleaned", prefix=built.prefix), TARGET)
    res = pack_env(b, tmp_path / "cleaned.tar.zst")
    dest = tmp_path / "far" / "away" / "from" / "the" / "build" / "directory" / "cleaned"
    assert len(str(dest)) > len(str(built.prefix))
    unpack(res.path, dest)
    run(dest / "bin" / "python", dest / "bin" / "conda-unpack")
    assert run(dest / "bin" / "llmtest-prefix") == f"prefix={dest}\n"
    assert (dest / "share" / "llmtest" / "prefix.txt").read_text() == f"prefix={dest}\n"
    assert run(dest / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_config_var('prefix'))") \
        == f"{dest}\n"
