"""`pack build` end to end on the build side: real hub clients against the loopback hub, through the CLI
as a user runs it; pinning, reproducibility, resume via the content store, inspect/verify/split."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from devkit.tiny_model import make_tiny_model
from installer import bundle as fmt
from packager.build import INSTALLER_PKG, installer_archive
from packager.cli import main
from packager.store import ContentStore
from packager.tarball import inputs_key, write_tar_gz

pytest_plugins = ("tests.hub.fixtures",)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    r = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "build")])
    assert r.exit_code == 0, r.output
    return tmp_path / "build"


def write_manifest(path: Path, hub_url: str, *, version: str = "1.0") -> Path:
    path.write_text(f"""\
bundle: {{name: tiny, version: "{version}"}}
models:
  - {{name: tiny-hf, source: huggingface, repo: demo/tiny, revision: main, endpoint: "{hub_url}",
     allow_patterns: ["*.json", "*.safetensors"]}}
  - {{name: tiny-ms, source: modelscope, repo: demo/tiny, revision: master, endpoint: "{hub_url}"}}
services:
  - {{name: tiny, model: tiny-hf, port: 8000, serve_by: repo_id}}
""")
    return path


def pack(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_build_verify_inspect_split(tmp_path: Path, hub, hub_env, tiny: Path, keys: Path) -> None:
    commit = hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    r = pack("build", str(m), "--key", f"{keys}.key", "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    bundle = tmp_path / "out" / "tiny-1.0"
    assert f"-> {commit}" in r.stdout and "signed by sha256:" in r.stdout

    r = pack("verify", str(bundle), "--pubkey", f"{keys}.pub")
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stdout + r.stderr

    r = pack("inspect", str(bundle), "--json")
    info = json.loads(r.stdout)
    hf = next(x for x in info["models"] if x["name"] == "tiny-hf")
    assert hf["commit"] == commit and hf["revision"] == "main" and hf["source"] == "huggingface"
    # allow_patterns kept the json + safetensors files only
    names = sorted(a["path"] for a in json.loads((bundle / "MANIFEST.json").read_text())["models"][0]["files"])
    assert names == sorted(p.name for p in tiny.iterdir() if p.suffix in (".json", ".safetensors"))
    ms = next(x for x in info["models"] if x["name"] == "tiny-ms")
    assert ms["files"] == len(list(tiny.iterdir()))
    doc = json.loads((bundle / "MANIFEST.json").read_text())
    # what pins each model, said precisely in MANIFEST.json: HF gives the commit; a ModelScope branch is
    # pinned by content, with the commit ids ModelScope lists for its files beside it
    hf_m, ms_m = doc["models"]
    assert (hf_m["pinned_by"], hf_m["commit"]) == ("commit", commit)
    assert ms_m["pinned_by"] == "content" and ms_m["commit"] == ms_m["content_hash"]
    assert ms_m["hub_file_commits"] == [commit] and ms_m["revision"] == "master"
    assert doc["models"][0]["config"]["num_attention_heads"] == 4
    assert doc["services"][0]["serve_by"] == "repo_id"
    # model files are real files with the bytes of the source, never symlinks into a hub cache
    for f in tiny.iterdir():
        p = bundle / "models" / "tiny-ms" / f.name
        assert p.is_file() and not p.is_symlink() and p.read_bytes() == f.read_bytes()

    r = pack("split", str(bundle), "--size", "200K", "--out", str(tmp_path / "usb"), "--json")
    assert r.returncode == 0, r.stderr
    vols = json.loads(r.stdout)["volumes"]
    assert len(vols) >= 3 and all(v["size"] <= 200 * 1024 for v in vols)
    for v in vols:  # every volume checks itself with plain sha256sum
        c = subprocess.run(["sha256sum", "--quiet", "-c", fmt.VOLUME_INDEX], cwd=v["path"], capture_output=True)
        assert c.returncode == 0, c.stdout


def test_same_inputs_give_identical_bytes_and_rebuild_fetches_nothing(tmp_path: Path, hub, hub_env,
                                                                     tiny: Path, keys: Path) -> None:
    hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    for out in ("a", "b"):
        r = pack("build", str(m), "--key", f"{keys}.key", "--out", str(tmp_path / out), "--no-progress")
        assert r.returncode == 0, r.stderr
        if out == "a":
            first = hub.total_downloads()
            assert first > 0
    assert hub.total_downloads() == first, "the second build must come from the content store"
    a, b = tmp_path / "a" / "tiny-1.0", tmp_path / "b" / "tiny-1.0"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_installer_archive_is_reused_only_while_the_installer_is_unchanged(tmp_path: Path) -> None:
    pkg = tmp_path / "installer"
    shutil.copytree(INSTALLER_PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    store = ContentStore(tmp_path / "store")
    sha1, size1 = installer_archive(store, tmp_path / "b1" / "installer.tar.gz", pkg)
    fresh = write_tar_gz(tmp_path / "fresh.tar.gz", [("installer", pkg)])
    assert (sha1, size1) == (fresh.sha256, fresh.size)  # the bytes a fresh archive has
    second = tmp_path / "b2" / "installer.tar.gz"
    assert installer_archive(store, second, pkg)[0] == sha1
    assert second.stat().st_ino == store.blob(sha1).stat().st_ino  # reused: hardlinked, not compressed again

    key = inputs_key([("installer", pkg)])
    os.utime(pkg / "bundle" / "reader.py", (1, 1))  # mtimes are not in the archive (fixed): same key
    assert inputs_key([("installer", pkg)]) == key
    (pkg / "errors.py").chmod(0o755)  # the exec bit is
    assert inputs_key([("installer", pkg)]) != key
    (pkg / "errors.py").chmod(0o644)
    with open(pkg / "bundle" / "reader.py", "a") as f:
        f.write("# changed\n")
    sha3, _ = installer_archive(store, tmp_path / "b3" / "installer.tar.gz", pkg)
    assert sha3 != sha1 and sha3 == write_tar_gz(tmp_path / "fresh3.tar.gz", [("installer", pkg)]).sha256


def test_bad_manifest_via_cli_lists_problems_no_traceback(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("bundle: {name: x, versoin: 1}\nmodels: [{name: m, source: hf}]\n")
    r = pack("build", str(m), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "did you mean 'version'" in r.stderr and "models[0].source" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_repo_fails_before_anything_is_written(tmp_path: Path, hub, hub_env) -> None:
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    r = pack("build", str(m), "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "demo/tiny" in r.stderr and "not found" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corrupted_download_is_caught_and_bundle_not_written(tmp_path: Path, hub, hub_env, tiny: Path) -> None:
    hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    hub.corrupt("demo/tiny", "model.safetensors")
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    r = pack("build", str(m), "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "model.safetensors" in r.stderr and "mismatch" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_key_fails_before_downloading(tmp_path: Path, hub, hub_env, tiny: Path, keys: Path) -> None:
    hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    r = pack("build", str(m), "--key", f"{keys}.pub", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "not the .pub" in r.stderr
    assert hub.total_downloads() == 0


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    import hashlib
    return {p.relative_to(root).as_posix(): (p.lstat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest()
                                             if p.is_file() and not p.is_symlink() else "")
            for p in sorted(root.rglob("*"))}


def test_a_rotted_store_blob_is_refused_before_signing_and_fetched_again(tmp_path: Path, hub, hub_env,
                                                                         tiny: Path, keys: Path) -> None:
    hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    m = write_manifest(tmp_path / "m.yaml", hub.url)
    args = ("build", str(m), "--key", f"{keys}.key", "--out", str(tmp_path / "out"), "--no-progress")
    assert pack(*args).returncode == 0
    downloads = hub.total_downloads()
    store = ContentStore(tmp_path / "store")
    doc = json.loads((tmp_path / "out" / "tiny-1.0" / "MANIFEST.json").read_text())
    sha = next(f["sha256"] for f in doc["models"][0]["files"] if f["path"] == "model.safetensors")
    blob = store.blob(sha)
    shutil.copytree(tmp_path / "out", tmp_path / "out-copy")  # the bundle shares the blob's inode: compare a copy
    os.unlink(tmp_path / "out" / "tiny-1.0" / "models" / "tiny-hf" / "model.safetensors")
    os.unlink(tmp_path / "out" / "tiny-1.0" / "models" / "tiny-ms" / "model.safetensors")
    shutil.copyfile(tmp_path / "out-copy" / "tiny-1.0" / "models" / "tiny-hf" / "model.safetensors",
                    tmp_path / "out" / "tiny-1.0" / "models" / "tiny-hf" / "model.safetensors")
    shutil.copyfile(tmp_path / "out-copy" / "tiny-1.0" / "models" / "tiny-ms" / "model.safetensors",
                    tmp_path / "out" / "tiny-1.0" / "models" / "tiny-ms" / "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x08  # bit rot in the store: same size, same name, other bytes
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    before = _tree(tmp_path / "out")
    r = pack(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert re_search(rf"models/tiny-(hf|ms)/model.safetensors \(from {blob}\): sha256 mismatch \(expected {sha}",
                     r.stderr), r.stderr
    assert f"removed the damaged blob {blob} from the content store" in r.stderr
    assert _tree(tmp_path / "out") == before, "the previous bundle is untouched, nothing half-written"
    assert not blob.exists()
    r = pack(*args)  # a re-run fetches the damaged file again (only it) and signs a good bundle
    assert r.returncode == 0, r.stderr
    assert hub.total_downloads() == downloads + 1
    r = pack("verify", str(tmp_path / "out" / "tiny-1.0"), "--pubkey", f"{keys}.pub")
    assert r.returncode == 0, r.stderr
    print("rotted store blob: refused before signing, blob dropped, re-run fetched 1 file and verified")


def test_a_local_model_edited_in_place_behind_the_stat_cache_is_refused(tmp_path: Path, tiny: Path,
                                                                       keys: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    m = tmp_path / "local.yaml"
    m.write_text(f"bundle: {{name: loc, version: '1'}}\nmodels:\n  - {{name: m, source: local, path: {model}}}\n")
    env = {"LLM_PACK_STORE": str(tmp_path / "store")}
    args = ("build", str(m), "--key", f"{keys}.key", "--out", str(tmp_path / "out"), "--no-progress")
    r = pack(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert "models placed: " in r.stdout and "hardlink" in r.stdout
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    with open(weights, "r+b") as f:  # in place: same inode, same size, and the mtime put back (rsync -t, cp -p)
        f.write(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = _tree(tmp_path / "out")
    r = pack(*args, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"models/m/model.safetensors (from {weights}): sha256 mismatch" in r.stderr, r.stderr
    assert f"building again hashes {weights} anew" in r.stderr
    assert _tree(tmp_path / "out") == before
    r = pack(*args, env=env)  # the stale stat cache entry is gone: hashed again, signed as it is now
    assert r.returncode == 0, r.stderr
    r = pack("verify", str(tmp_path / "out" / "loc-1"), "--pubkey", f"{keys}.pub")
    assert r.returncode == 0, r.stderr


def re_search(pattern: str, text: str) -> bool:
    import re
    return re.search(pattern, text) is not None


# -- ordinary OS failures: one clear message, exit 74, nothing half-written (real causes, no mocks) -----------
@pytest.fixture()
def small_fs(tmp_path: Path):
    """A 2 MiB tmpfs (a real full disk); ``ro=True`` variant via ``small_fs(ro=True)``."""
    mounts: list[Path] = []

    def make(size: str = "2m", ro: bool = False) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield make
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_while_assembling_is_a_clear_error_and_the_previous_bundle_stays(
        tmp_path: Path, hub, hub_env, tiny: Path, keys: Path, small_fs) -> None:
    out = small_fs("2m")
    hub.add_repo_from_dir("demo/tiny", tiny, also_branches=("master",))
    m = tmp_path / "m.yaml"
    m.write_text("bundle: {name: full, version: '1'}\nmodels:\n"
                 f"  - {{name: tiny, source: huggingface, repo: demo/tiny, revision: main, endpoint: '{hub.url}'}}\n")
    args = ("build", str(m), "--key", f"{keys}.key", "--out", str(out), "--no-progress")
    r = pack(*args)
    assert r.returncode == 0, r.stderr  # ~0.8 MB: fits
    big = tmp_path / "big"
    shutil.copytree(tiny, big)
    (big / "extra.safetensors").write_bytes(os.urandom(3 << 20))  # does not fit in what is left
    hub.add_repo_from_dir("demo/tiny", big, also_branches=("master",))
    before = _tree(out)
    r = pack(*args)
    assert r.returncode == 74, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "error: No space left on device: " in r.stderr and f"df -h {out}" in r.stderr, r.stderr
    assert _tree(out) == before, "the previous bundle is untouched and no staging directory is left"
    print(f"ENOSPC: exit 74, {len(before)} paths in --out unchanged")


def test_out_is_a_file_and_a_read_only_key_dir_are_clear_errors(tmp_path: Path, tiny: Path, keys: Path,
                                                                small_fs) -> None:
    (tmp_path / "out").write_text("not a directory\n")
    m = tmp_path / "m.yaml"
    m.write_text(f"bundle: {{name: x, version: '1'}}\nmodels:\n  - {{name: m, source: local, path: {tiny}}}\n")
    r = pack("build", str(m), "--out", str(tmp_path / "out"), "--no-progress",
             env={"LLM_PACK_STORE": str(tmp_path / "store")})
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr
    assert f"error: File exists: {tmp_path / 'out'}" in r.stderr and "move it away" in r.stderr, r.stderr
    assert (tmp_path / "out").read_text() == "not a directory\n"
    ro = small_fs("1m", ro=True)
    r = pack("keygen", "--out", str(ro / "build"))
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr
    assert "error: Read-only file system: " in r.stderr and "mounted read-only" in r.stderr, r.stderr
    assert os.listdir(ro) == []
    r = pack("verify", str(tmp_path / "nowhere"), "--insecure")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a bundle directory" in r.stderr


def test_keygen_on_a_full_disk_leaves_no_half_key_pair(tmp_path: Path, small_fs) -> None:
    fs = small_fs("64k")
    with open(fs / "filler", "wb", buffering=0) as f:  # fill it up, as a real full disk is
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(fs / "filler", (fs / "filler").stat().st_size - 4096)  # room for the first key file only
    before = sorted(os.listdir(fs))
    r = pack("keygen", "--out", str(fs / "build"))
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr
    assert "error: No space left on device" in r.stderr and "df -h" in r.stderr, r.stderr
    assert sorted(os.listdir(fs)) == before, "no build.key without build.pub, no temp file"


def test_a_local_model_edited_while_the_build_reads_it_is_refused(tmp_path: Path, tiny: Path, keys: Path) -> None:
    """A real `pack build`: the operator writes into a local weight file while the build's one hashing pass
    (after fetch, before signing) reads it through the bundle's hardlink -> refused by name, nothing written."""
    import time

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    big = model / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: seconds of hashing, no disk
    m = tmp_path / "local.yaml"
    m.write_text(f"bundle: {{name: edit, version: '1'}}\nmodels:\n  - {{name: m, source: local, path: {model}}}\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "packager.cli", "build", str(m), "--key", f"{keys}.key",
                             "--out", str(out), "--no-progress", "-j", "2"], cwd=ROOT, text=True,
                            env={**os.environ, "LLM_PACK_STORE": str(tmp_path / "store")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any((d / "models" / "m" / "big.safetensors").exists() for d in out.glob(".edit-1.*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    time.sleep(0.2)
    assert proc.poll() is None, "the build finished before the edit"
    with open(big, "r+b") as f:  # in place, through the operator's own path
        f.seek(2 << 30)
        f.write(b"edited")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"models/m/big.safetensors (from {big}): content mismatch (expected unchanged" in err, err
    assert os.listdir(out) == [], "no bundle, no staging directory"


def test_a_rotted_blob_copied_to_another_filesystem_is_refused_too(tmp_path: Path, hub, hub_env, tiny: Path,
                                                                   keys: Path, small_fs) -> None:
    out = small_fs("8m")  # not the store's filesystem: no hardlink, the blob is copied (and hashed on the way)
    hub.add_repo_from_dir("demo/tiny", tiny)
    m = tmp_path / "m.yaml"
    m.write_text("bundle: {name: cp, version: '1'}\nmodels:\n"
                 f"  - {{name: tiny, source: huggingface, repo: demo/tiny, revision: main, endpoint: '{hub.url}'}}\n")
    args = ("build", str(m), "--key", f"{keys}.key", "--out", str(out), "--no-progress")
    r = pack(*args)
    assert r.returncode == 0 and "models placed: 5 copy" in r.stdout, r.stdout + r.stderr
    doc = json.loads((out / "cp-1" / "MANIFEST.json").read_text())
    sha = next(f["sha256"] for f in doc["models"][0]["files"] if f["path"] == "model.safetensors")
    blob = ContentStore(tmp_path / "store").blob(sha)
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    before = _tree(out)
    r = pack(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{blob}: sha256 mismatch (expected {sha}" in r.stderr, r.stderr
    assert f"removed the damaged blob {blob}" in r.stderr and not blob.exists()
    assert _tree(out) == before
    r = pack(*args)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_a_full_content_store_during_download_says_disk_not_network(tmp_path: Path, hub, hub_env, tiny: Path,
                                                                    source: str, small_fs) -> None:
    store = small_fs("2m")
    big = tmp_path / "big"
    shutil.copytree(tiny, big)
    (big / "model-2.safetensors").write_bytes(os.urandom(3 << 20))  # more than the store's disk holds
    hub.add_repo_from_dir("demo/big", big, also_branches=("master",))
    m = tmp_path / "m.yaml"
    rev = "main" if source == "huggingface" else "master"
    m.write_text("bundle: {name: st, version: '1'}\nmodels:\n"
                 f"  - {{name: b, source: {source}, repo: demo/big, revision: {rev}, endpoint: '{hub.url}'}}\n")
    r = pack("build", str(m), "--out", str(tmp_path / "out"), "--no-progress", "--store", str(store))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    # downloads run in parallel: whichever file hits the full disk first is the one named
    assert re.search(r"cannot store demo/big/\S+: the disk is full", r.stderr), r.stderr
    assert "--store / LLM_PACK_STORE" in r.stderr and "check the network" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
