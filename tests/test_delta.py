"""Delta bundles end to end in a staging tree (--root): built against an earlier bundle or a server inventory
(`llm-install --inventory --json`), verified, installed on top of the base with the unchanged model files
hardlinked from the installed copies (each hashed), rolled back and uninstalled; refused before anything
changes on a server that lacks the base, or whose installed copy was altered. Real bundles, the real
installer in a subprocess and the real install.sh."""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer.bundle import Bundle
from packager.against import load_against
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    Model,
    keys,  # noqa: F401
    make_bundle,
    run_command,
    run_installer,
    service,
    t1_parts,  # noqa: F401
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = os.urandom(256 << 10)
SHARD2 = os.urandom(128 << 10)


def model(commit: str, *, config: bytes = b'{"num_attention_heads": 4, "num_key_value_heads": 2}\n',
          extra: dict[str, bytes] | None = None) -> Model:
    return Model("tiny", {"config.json": config, "model-00001.safetensors": WEIGHTS,
                          "model-00002.safetensors": SHARD2, **(extra or {})}, commit=commit)


@pytest.fixture(scope="module")
def v1(tmp_path_factory, t1_parts, keys) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v1"), BundleSpec(
        version="1.0.0", env=t1_parts, models=[model("1" * 40)], services=[service()]), keys)


def v2_spec(t1_parts) -> BundleSpec:
    """A new model commit: config.json changed, a file added, the two shards unchanged; same environment."""
    m = model("2" * 40, config=b'{"num_attention_heads": 4, "num_key_value_heads": 2, "rope": 1}\n',
              extra={"generation_config.json": b'{"temperature": 0.6}\n'})
    return BundleSpec(version="1.1.0", env=t1_parts, models=[m], services=[service()])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def pack(*args: str | Path) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "packager.cli", *map(str, args)], check=False, timeout=300, cwd=ROOT)


def install(root: Path, bundle: Path, keys, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_installer("install", "--bundle", bundle, "--root", root, "--pubkey", keys.pub, *extra, check=check)


def files_of(bundle: Path) -> set[str]:
    return {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}


def test_delta_against_a_bundle_leaves_out_what_it_holds(v1, t1_parts, keys, tmp_path):
    d = make_bundle(tmp_path / "out", v2_spec(t1_parts), keys, against=load_against([v1]))
    doc = json.loads((d / "MANIFEST.json").read_text())
    provided = {a["path"] for a in doc["artifacts"] if a.get("provided") == "target"}
    assert provided == {"envs/t1.tar.zst", "runtime/t1.tar.gz", "models/tiny/model-00001.safetensors",
                        "models/tiny/model-00002.safetensors"}
    # what is left out is not in the directory; the rest is, and the signed MANIFEST lists every file
    assert files_of(d) == {"MANIFEST.json", "MANIFEST.json.sig", "install.sh", "installer.tar.gz",
                           "models/tiny/config.json", "models/tiny/generation_config.json"}
    assert doc["delta"] == {"against": "bundle", "base": [
        {"name": "demo", "version": "1.0.0", "manifest_sha256": Bundle.load(v1).manifest_sha256}]}
    assert [f["path"] for f in doc["models"][0]["files"]] == [
        "config.json", "generation_config.json", "model-00001.safetensors", "model-00002.safetensors"]
    b = Bundle.load(d)
    assert b.provided_size() == t1_parts.archive.stat().st_size + t1_parts.runtime.stat().st_size + \
        len(WEIGHTS) + len(SHARD2)

    r = pack("verify", d, "--pubkey", keys.pub)
    assert r.returncode == 0 and "a delta: 4 artifacts" in r.stdout, r.stdout + r.stderr
    r = pack("inspect", d)
    assert r.returncode == 0, r.stderr
    assert "delta: built against demo 1.0.0 (bundle); 4 artifacts" in r.stdout
    assert "needs environment t1 (content" in r.stdout and "needs 2 of the 4 files of model tiny" in r.stdout
    assert "needs the installer runtime" in r.stdout
    info = json.loads(pack("inspect", d, "--json").stdout)["delta"]
    assert info["models"] == [{"name": "tiny", "commit": "2" * 40, "files": 2, "of_files": 4,
                               "size": len(WEIGHTS) + len(SHARD2)}]
    # a file the delta leaves out, put back into the bundle: not what was signed (an unlisted file)
    (d / "envs").mkdir()
    os.link(t1_parts.archive, d / "envs/t1.tar.zst")
    r = pack("verify", d, "--pubkey", keys.pub)
    assert r.returncode != 0 and "not listed" in r.stderr, r.stdout + r.stderr


def sh(bundle: Path, root: Path, keys, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(bundle.parent)}
    return run_command(["bash", bundle / "install.sh", "--root", root, "--pubkey", keys.pub, *extra], check=check,
                       timeout=300, env=env)


def test_delta_from_the_server_inventory_installs_on_top_rolls_back_uninstalls(root, v1, t1_parts, keys, tmp_path):
    before = tree_snapshot(root)
    sh(v1, root, keys)
    inv_text = run_installer("inventory", "--root", root, "--json").stdout
    inv = json.loads(inv_text)
    assert inv["source"]["kind"] == "server" and [b["version"] for b in inv["bundles"]] == ["1.0.0"]
    assert inv["bundles"][0]["active"] is True
    (env,) = inv["environments"]
    assert env["archive_sha256"] and env["path"].startswith("/opt/llm/envs/t1/")
    (m,) = inv["models"]
    assert m["commit"] == "1" * 40 and len(m["files"]) == 3 and all(len(f["sha256"]) == 64 for f in m["files"])
    assert len(inv["runtimes"]) == 1
    text = run_installer("inventory", "--root", root).stdout
    assert "* demo 1.0.0" in text and "tiny: huggingface acme/tiny @ " + "1" * 40 in text

    inv_file = tmp_path / "server.json"
    inv_file.write_text(inv_text)
    d = make_bundle(tmp_path / "out", v2_spec(t1_parts), keys, against=load_against([inv_file]))
    assert json.loads((d / "MANIFEST.json").read_text())["delta"]["against"] == "inventory"

    r = sh(d, root, keys, "--dry-run")
    assert "2 of 4 files linked from installed copies" in r.stdout, r.stdout
    r = sh(d, root, keys)
    out = r.stdout + r.stderr
    assert "delta bundle: using the installer runtime an earlier install verified" in out
    assert "delta bundle: 4 artifacts" in out and "took 2 model files" in out and "2 hardlink" in out, out
    old = root / "opt/llm/models/tiny" / ("1" * 40)
    new = root / "opt/llm/models/tiny" / ("2" * 40)
    for f in ("model-00001.safetensors", "model-00002.safetensors"):  # one inode: no second copy on disk
        assert (new / f).stat().st_ino == (old / f).stat().st_ino
    assert (new / "generation_config.json").read_bytes() == b'{"temperature": 0.6}\n'
    st = json.loads(run_installer("status", "--root", root, "--json").stdout)
    assert st["bundles"][0]["active"] == "1.1.0" and st["bundles"][0]["previous"] == "1.0.0"
    # the new version uses the runtime v1 installed: it is recorded as a user of it (kept while either is)
    state = json.loads((root / "var/lib/llm/state.json").read_text())
    (rt,) = [t for t in state["objects"] if t.startswith("/opt/llm/runtime/") and not t.endswith("current")]
    assert len(state["objects"][rt]["users"]) == 2, state["objects"][rt]

    run_installer("rollback", "--root", root)
    st = json.loads(run_installer("status", "--root", root, "--json").stdout)
    assert st["bundles"][0]["active"] == "1.0.0"
    assert (old / "model-00001.safetensors").read_bytes() == WEIGHTS
    run_installer("uninstall", "--root", root)
    assert tree_snapshot(root) == before


def test_delta_is_refused_on_a_server_without_its_base(root, v1, t1_parts, keys, tmp_path):
    d = make_bundle(tmp_path / "out", v2_spec(t1_parts), keys, against=load_against([v1]))
    before = tree_snapshot(root)
    r = install(root, d, keys, check=False)
    assert r.returncode != 0
    assert "demo 1.1.0 is a delta bundle" in r.stderr and "this server lacks what it needs" in r.stderr, r.stderr
    assert "environment t1 (content" in r.stderr and "model tiny @ " + "2" * 40 + ": 2 file(s)" in r.stderr
    assert "built against demo 1.0.0 (bundle)" in r.stderr and "install the full bundle" in r.stderr
    assert tree_snapshot(root) == before
    # the preflight says the same (install.sh --check, the fleet's first step)
    r = run_installer("check", "--bundle", d, "--root", root, "--pubkey", keys.pub, "--json", check=False)
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 1 and rows["delta"]["status"] == "FAIL", r.stdout
    # install.sh itself: the runtime the delta leaves out is not here -> it stops before running anything
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp_path)}
    r = run_command(["bash", d / "install.sh", "--root", root, "--pubkey", keys.pub], check=False, timeout=300,
                    env=env)
    assert r.returncode != 0 and "needs the installer runtime" in r.stderr, r.stdout + r.stderr
    assert tree_snapshot(root) == before


def test_delta_refuses_an_altered_installed_copy_and_changes_nothing(root, v1, t1_parts, keys, tmp_path):
    sh(v1, root, keys)
    shard = root / "opt/llm/models/tiny" / ("1" * 40) / "model-00002.safetensors"
    d = make_bundle(tmp_path / "out", v2_spec(t1_parts), keys, against=load_against([v1]))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only the hash sees it
    os.chmod(shard, 0o644)
    shard.write_bytes(bytes(data))
    before = {k: v for k, v in tree_snapshot(root).items() if "var/lib/llm/staging" not in k}
    r = sh(d, root, keys, check=False)
    assert r.returncode != 0
    assert "model-00002.safetensors (installed copy" in r.stderr and "install the full bundle" in r.stderr, r.stderr
    after = {k: v for k, v in tree_snapshot(root).items() if "var/lib/llm/staging" not in k}
    assert after == before
    st = json.loads(run_installer("status", "--root", root, "--json").stdout)
    assert st["bundles"][0]["active"] == "1.0.0"


def test_pack_inventory_of_a_bundle_and_bad_against_inputs(v1, tmp_path):
    r = pack("inventory", v1)
    assert r.returncode == 0 and "* demo 1.0.0" in r.stdout and "t1: content " in r.stdout, r.stdout + r.stderr
    inv = json.loads(pack("inventory", v1, "--json").stdout)
    assert inv["source"]["kind"] == "bundle" and inv["models"][0]["files"][0]["path"] == "config.json"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    m = tmp_path / "m.yaml"
    m.write_text(f'bundle: {{name: x, version: "1"}}\nmodels: [{{name: m, source: local, path: "{model_dir}"}}]\n')
    cases = {
        tmp_path / "missing.json": "no such file or directory",
        tmp_path / "junk.json": "not JSON",
        tmp_path / "other.json": "neither a server inventory nor a MANIFEST.json",
        tmp_path / "old.json": "not an inventory of version 1",
    }
    (tmp_path / "junk.json").write_text("{oops")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "old.json").write_text('{"inventory_version": 99}')
    for path, why in cases.items():
        r = pack("build", m, "--out", tmp_path / "out", "--no-progress", "--against", path)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, (path, r.stderr)
        assert not (tmp_path / "out").exists()  # refused before anything was built


def test_an_environment_rebuilt_from_the_same_lock_packs_to_the_same_sha256(conda_channel, wheel_dir, tmp_path):
    """A delta leaves an environment out by its archive's sha256: a rebuild from the same lock (an emptied build
    cache) must give the same bytes (pip's .pyc files are hash-checked, not stamped
    with the install time; the archive's members are sorted with fixed mtime and owner)."""
    from packager.env.build import build_env
    from packager.env.pack import pack_env
    from tests.conda.fixtures import TARGET, env_spec

    shas = []
    for i in range(2):
        shutil.rmtree(tmp_path / "work", ignore_errors=True)  # the build cache emptied: everything built again
        built = build_env(env_spec("t1", conda_channel, wheel_dir), TARGET, tmp_path / "work", progress=False)
        assert list(built.prefix.rglob("*.pyc")), "pip compiled nothing: the test would prove nothing"
        packed = pack_env(built, tmp_path / f"t1-{i}.tar.zst")
        shas.append((built.content_hash, packed.sha256))
        time.sleep(1.1)  # a later second: an install-time stamp would differ
    assert shas[0] == shas[1]
