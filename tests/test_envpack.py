"""Packing a real environment: tar.zst with conda-pack's relocation semantics, unpacked elsewhere and run;
the pack cache; the installer runtime cut from the env."""
# ruff: noqa: F811  (pytest fixtures imported from tests.conda.fixtures are redefined as parameters)

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from packager.env.build import build_env, inspect_env
from packager.env.pack import cached_pack, pack_env
from packager.env.runtime import cut_runtime
from packager.errors import EnvironmentBuildError
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
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr:
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
    with open(packed.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            members = list(t)
    assert packed.files == len(members)
    assert packed.unpacked_size == sum(m.size for m in members if m.isfile())
    assert not [p for p in packed.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_archive_is_deterministic_and_normalised(packed, built_env, tmp_path):
    again = pack_env(built_env, tmp_path / "again.tar.zst", threads=1)
    assert again.sha256 == packed.sha256  # same bytes whatever the thread count
    with open(packed.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as t:
            members = list(t)
    names = [m.name for m in members]
    generated = ["bin/activate", "bin/activate.fish", "bin/conda-unpack", "bin/conda_unpack_progress.py",
                 "bin/deactivate"]
    assert names[-5:] == generated  # conda-pack's files come last, sorted
    # first the directories and symlinks (frame 0), then the regular files (later frames), each sorted
    kinds = [m.isreg() for m in members[:-5]]
    assert kinds == sorted(kinds)
    cut = kinds.index(True)
    assert names[:cut] == sorted(names[:cut]) and names[cut:-5] == sorted(names[cut:-5])
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
    stem = fourth.path.name.removesuffix(".tar.zst")
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{stem}.tar.zst", f"{stem}.json", f".{stem}.lock"])


def test_two_builds_packing_one_environment_at_once_pack_it_once(built_env, tmp_path):
    """Two `pack build`s on one host (or test files on two workers) pack the same environment: the second
    waits for the first and reuses its archive instead of racing it over the same files."""
    cache = tmp_path / "packed"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cached_pack(built_env, cache), range(2)))
    assert sorted(r.reused for r in results) == [False, True]
    assert len({(r.path, r.sha256, r.size) for r in results}) == 1
    assert hashlib.sha256(results[0].path.read_bytes()).hexdigest() == results[0].sha256


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
    with open(res.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr:
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
            "with open(sys.argv[1], 'rb') as f, \\\n"
            "        zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as z:\n"
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


# -- binary placeholders restored as a stream (bounded memory whatever the file's size) -----------------------
def _restore_oracle(data: bytes, installed: bytes, placeholder: bytes) -> bytes:
    """The one-shot regex rule the packer used to apply to a whole file in memory (the reference)."""
    import re

    extra = len(placeholder) - len(installed)
    out, pos = bytearray(), 0
    for m in re.finditer(re.escape(installed) + rb"([^\0]*?)\0", data):
        if m.start() < pos:
            continue
        need = extra * m.group().count(installed)
        if data[m.end():m.end() + need] != b"\0" * need:
            raise ValueError("no NUL padding")
        out += data[pos:m.start()] + m.group().replace(installed, placeholder)
        pos = m.end() + need
    return bytes(out + data[pos:])


def test_streamed_restore_agrees_with_the_one_shot_rule_at_any_chunking():
    import random

    from packager.env.placeholder import PlaceholderRestorer

    rng = random.Random(9)
    inst, ph = b"/build/env", b"/placeholder_placeholder_xx"
    pad = b"\0" * (len(ph) - len(inst))
    cases = refused = 0
    for _ in range(2000):
        parts = []
        for _ in range(rng.randint(0, 6)):
            k = rng.random()
            if k < 0.4:
                parts.append(bytes(rng.choice(b"ab\0/") for _ in range(rng.randint(0, 20))))
            elif k < 0.8:
                s = inst + bytes(rng.choice(b"xyz/") for _ in range(rng.randint(0, 8)))
                s += inst if rng.random() < 0.3 else b""
                parts.append(s + b"\0" + (pad * s.count(inst) if rng.random() < 0.85 else b"q"))
            else:
                parts.append(inst[:rng.randint(1, len(inst))])  # a prefix cut short (maybe at a chunk edge)
        data = b"".join(parts)
        try:
            want = _restore_oracle(data, inst, ph)
        except ValueError:
            want = None
        r = PlaceholderRestorer(inst, ph)
        try:
            got, i = bytearray(), 0
            while i < len(data):
                n = rng.randint(1, 7)
                got += r.feed(data[i:i + n])
                i += n
            got = bytes(got + r.finish())
        except ValueError:
            got = None
        cases += 1
        refused += got is None
        assert got == want, data
        assert got is None or len(got) == len(data)
    print(f"placeholder restore: {cases} cases at random chunkings agree with the one-shot rule "
          f"({refused} refused by both)")
    assert refused > 0 and cases - refused > 1000


def test_a_binary_larger_than_the_chunk_is_restored_as_a_stream(conda_channel, wheel_dir, tmp_path):
    """A 48 MiB binary with prefixes at a chunk boundary packs with bounded memory (it used to be read
    whole, about 3x its size with the restore) and relocates like the small one."""
    import json
    import tracemalloc

    from packager.env.pack import CHUNK, load_env_files

    spec = env_spec("bigbin", conda_channel, wheel_dir, pip=PipSpec(), conda=("llmtest-bin", "llmtest-text"),
                    cuda=None)
    built = build_env(spec, TARGET, tmp_path / "work", progress=False)
    for meta in (built.prefix / "conda-meta").glob("*.json"):  # no package cache: placeholders from conda-meta
        doc = json.loads(meta.read_text())
        doc["link"]["source"] = str(tmp_path / "gone" / meta.stem)
        meta.write_text(json.dumps(doc))
    b = inspect_env(EnvSpec(name="bigbin", prefix=built.prefix), TARGET)
    placeholder = load_env_files(b)[1]["bin/llmtest-prefix"].encode()
    binary = b.prefix / "bin" / "llmtest-prefix"
    installed = str(b.prefix).encode()
    string = installed + b"/lib/extra\0" + b"\0" * (len(placeholder) - len(installed))
    size0 = binary.stat().st_size
    with open(binary, "ab") as f:  # after the ELF image: harmless to the program, and rewritten like its strings
        f.write(os.urandom(CHUNK - size0 % CHUNK - 5))
        f.write(string)  # straddles a chunk boundary
        f.write(os.urandom(47 * CHUNK))
        f.write(string)
    size = binary.stat().st_size
    tracemalloc.start()
    try:
        res = pack_env(b, tmp_path / "bigbin.tar.zst")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"48 MiB binary with placeholders packed: peak Python memory {peak / 2**20:.1f} MiB")
    assert peak < 12 * 2**20, f"{peak / 2**20:.1f} MiB: the file was not streamed"
    dest = tmp_path / "far" / "away" / "from" / "the" / "build" / "directory" / "bigbin"
    unpack(res.path, dest)
    packed_bin = (dest / "bin" / "llmtest-prefix").read_bytes()
    assert len(packed_bin) == size and packed_bin.count(placeholder + b"/lib/extra\0") == 2
    run(dest / "bin" / "python", dest / "bin" / "conda-unpack")
    assert run(dest / "bin" / "llmtest-prefix") == f"prefix={dest}\n"
    relocated = (dest / "bin" / "llmtest-prefix").read_bytes()
    want = str(dest).encode() + b"/lib/extra\0"
    assert len(relocated) == size and relocated.count(want) == 2
