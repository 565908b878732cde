"""Lifecycle in a staging tree (--root): install, idempotent re-run, upgrade, rollback, downgrade, uninstall,
lock contention, an install killed mid-extraction. Real bundles (tests/installer_fixtures.py), the real
installer in a subprocess (``python -m installer``), a real conda environment and conda-unpack."""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer.deploy.state import LOCK_FILE, STATE_DIR, Lock, compare_versions
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    env_parts,
    keys,  # noqa: F401
    make_bundle,
    models_only_bundle,
    run_installer,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)


def install(root: Path, bundle: Path, keys, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_installer(
        "install", "--bundle", bundle, "--root", root, "--pubkey", keys.pub, *extra, check=check
    )


def state(root: Path) -> dict:
    return json.loads((root / STATE_DIR / "state.json").read_text())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "hostname").write_text("server\n")
    return r


def test_install_then_idempotent_rerun(root, tmp_path, t1_parts, keys):
    b = make_bundle(
        tmp_path / "out",
        BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model()], services=[service()]),
        keys,
    )
    r = install(root, b, keys)
    print(r.stdout, r.stderr)
    st = state(root)
    assert st["lines"]["demo"]["active"].startswith("demo-1.0.0-")
    env = root / st["bundles"][st["lines"]["demo"]["active"]]["envs"]["t1"].lstrip("/")
    assert (env / ".llm-installed.json").is_file()
    # conda-unpack baked the target path (not the staging path) into the env
    out = subprocess.run([env / "bin" / "llmtest-prefix"], capture_output=True, text=True, check=False).stdout
    assert out == f"prefix=/{env.relative_to(root)}\n"
    before = tree_snapshot(root)
    r2 = install(root, b, keys)
    assert "nothing changed" in r2.stdout
    assert tree_snapshot(root) == before


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, t1_parts, keys):
    """v1, v2 (new model commit, same env), v3 (new model again); one with an HF view; a model-only one."""
    out = tmp_path_factory.mktemp("bundles")
    mk = lambda version, commit, **kw: make_bundle(  # noqa: E731
        out,
        BundleSpec(
            version=version, env=t1_parts, models=[tiny_model(commit=commit)], services=[service()], **kw
        ),
        keys,
    )
    return {
        "v1": mk("1.0.0", "1" * 40),
        "v2": mk("1.1.0", "2" * 40),
        "v3": mk("2.0.0", "3" * 40),
        "hf": make_bundle(
            out,
            BundleSpec(
                name="hfdemo",
                version="2026.11.21",
                env=t1_parts,
                models=[tiny_model("hfm", commit="a" * 40)],
                services=[service("hfsvc", model="hfm", port=18432, serve_by="repo_id")],
            ),
            keys,
        ),
        "models-only": models_only_bundle(out, keys),
    }


def env_file(root: Path, name: str = "tiny") -> dict:
    from installer.service import parse_env_file

    return parse_env_file((root / "etc" / "llm" / f"{name}.env").read_text())


def test_upgrade_rollback_downgrade_prune_uninstall(root, bundles, keys):
    before = tree_snapshot(root)
    install(root, bundles["v1"], keys)
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "1" * 40
    r = install(root, bundles["v2"], keys)
    assert "environment t1: already installed" in r.stdout  # same content hash: reused, not unpacked again
    s = state(root)["lines"]["demo"]
    assert s["active"].startswith("demo-1.1.0-") and s["previous"].startswith("demo-1.0.0-")
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "2" * 40
    assert (root / "opt/llm/models/tiny" / ("1" * 40)).is_dir(), "the previous version is kept"

    # rollback and back again
    r = run_installer("rollback", "--root", root)
    assert "1.1.0 -> 1.0.0" in r.stdout
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "1" * 40
    s = state(root)["lines"]["demo"]
    assert s["active"].startswith("demo-1.0.0-") and s["previous"].startswith("demo-1.1.0-")
    run_installer("rollback", "--root", root)
    assert state(root)["lines"]["demo"]["active"].startswith("demo-1.1.0-")

    # an older bundle over a newer one needs --allow-downgrade; nothing changes without it
    snap = tree_snapshot(root)
    r = install(root, bundles["v1"], keys, check=False)
    assert (
        r.returncode != 0 and "older than the installed 1.1.0" in r.stderr and "--allow-downgrade" in r.stderr
    )
    assert tree_snapshot(root) == snap
    install(root, bundles["v1"], keys, "--allow-downgrade")
    assert state(root)["lines"]["demo"]["active"].startswith("demo-1.0.0-")

    # v3: v1 active before, so v1 becomes previous and v2 (older than both kept versions) is pruned
    r = install(root, bundles["v3"], keys)
    s = state(root)
    assert s["lines"]["demo"]["active"].startswith("demo-2.0.0-")
    assert s["lines"]["demo"]["previous"].startswith("demo-1.0.0-")
    assert not (root / "opt/llm/models/tiny" / ("2" * 40)).exists() and "removed older version" in r.stdout
    assert sorted(b["version"] for b in s["bundles"].values()) == ["1.0.0", "2.0.0"]

    r = run_installer("status", "--root", root, "--json")
    st = json.loads(r.stdout)
    assert st["bundles"][0]["active"] == "2.0.0" and st["bundles"][0]["previous"] == "1.0.0"
    assert st["instances"][0]["instance"] == "tiny" and st["instances"][0]["port"] == 18431
    assert st["instances"][0]["version"] == "2.0.0"

    run_installer("uninstall", "--root", root)
    assert tree_snapshot(root) == before, "uninstall leaves the tree exactly as it was"


def test_dry_run_changes_nothing(root, bundles, keys):
    before = tree_snapshot(root)
    r = install(root, bundles["v1"], keys, "--dry-run")
    assert "unpack  environment t1" in r.stdout and "dry run: nothing was changed" in r.stdout
    assert tree_snapshot(root) == before


def test_hf_cache_view_and_model_only_bundle(root, bundles, keys):
    install(root, bundles["hf"], keys)
    bid = state(root)["lines"]["hfdemo"]["active"]
    repo = root / f"opt/llm/hf-cache/{bid}/hub/models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    assert (repo / "refs" / "main").read_text() == "a" * 40
    real = root / "opt/llm/models/hfm" / ("a" * 40) / "model.safetensors"
    assert (snap / "model.safetensors").is_symlink()
    assert (snap / "model.safetensors").resolve() == real.resolve()
    assert (snap / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"
    e = env_file(root, "hfsvc")
    assert e["LLM_MODEL"] == "acme/tiny" and e["HF_HUB_CACHE"] == f"/opt/llm/hf-cache/{bid}/hub"
    # a bundle without environment or runtime: its service runs on the env installed above
    install(root, bundles["models-only"], keys)
    e2 = env_file(root, "m2svc")
    st = state(root)
    assert set(st["lines"]) == {"hfdemo", "extra"}
    env_path = st["bundles"][st["lines"]["hfdemo"]["active"]]["envs"]["t1"]
    assert e2["LLM_PYTHON"].startswith(env_path + "/")
    # uninstalling the env's bundle alone keeps what the other bundle still uses
    run_installer("uninstall", "--root", root, "--name", "hfdemo")
    assert (root / env_path.lstrip("/") / "bin").is_dir()
    run_installer("uninstall", "--root", root)
    assert not (root / "opt").exists() and not (root / "var").exists()


def test_two_bundles_serving_one_repo_id_have_their_own_hf_views(root, bundles, keys, tmp_path, t1_parts):
    """Item 8: the HF cache view is per bundle; uninstalling one line leaves the other's view whole."""
    other = make_bundle(
        tmp_path / "out",
        BundleSpec(
            name="hfother",
            version="1",
            env=t1_parts,
            models=[tiny_model("hfm2", commit="c" * 40)],  # the same repo id acme/tiny, another commit
            services=[service("hfsvc2", model="hfm2", port=18434, serve_by="repo_id")],
        ),
        keys,
    )
    install(root, bundles["hf"], keys)
    install(root, other, keys)
    a, b = (state(root)["lines"][n]["active"] for n in ("hfdemo", "hfother"))
    views = {n: root / f"opt/llm/hf-cache/{bid}/hub/models--acme--tiny" for n, bid in (("a", a), ("b", b))}
    assert (views["a"] / "refs/main").read_text() == "a" * 40
    assert (views["b"] / "refs/main").read_text() == "c" * 40
    keep = tree_snapshot(views["b"])
    run_installer("uninstall", "--root", root, "--name", "hfdemo")
    assert not views["a"].exists()
    assert tree_snapshot(views["b"]) == keep
    for f in ("config.json", "model.safetensors", "tokenizer/vocab.txt"):  # every link still resolves
        assert (views["b"] / "snapshots" / ("c" * 40) / f).resolve().is_file()
    assert env_file(root, "hfsvc2")["HF_HUB_CACHE"] == f"/opt/llm/hf-cache/{b}/hub"


def _flip(bundle: Path, rel: str, dest: Path, offset: int = 100) -> Path:
    """A copy of ``bundle`` with one byte of ``rel`` flipped (same size: only the hash can tell)."""
    import shutil

    out = dest / bundle.name
    shutil.copytree(bundle, out)
    w = out / rel
    data = bytearray(w.read_bytes())
    data[offset] ^= 1
    w.unlink()  # the copy may be a hard link into the fixture
    w.write_bytes(bytes(data))
    return out


def _placed(root: Path) -> dict:
    """What the all-or-nothing promise covers: /opt/llm, /etc, and the state file."""
    snap = {k: v for k, v in tree_snapshot(root).items() if k.split("/")[0] in ("opt", "etc")}
    sp = root / STATE_DIR / "state.json"
    snap["<state>"] = sp.read_text() if sp.exists() else None
    return snap


def clean(root: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from pathlib import Path; from installer.deploy import lifecycle; "
            "lifecycle.clean(Path(sys.argv[1]))")
    from tests.installer_fixtures import INSTALLER_PKG, run_command

    return run_command([sys.executable, "-c", code, root], check=True, timeout=120, cwd=INSTALLER_PKG.parent)


@pytest.mark.parametrize("first", [True, False], ids=["first-install", "upgrade"])
def test_corrupt_model_file_refused_nothing_changed_then_resumed(root, bundles, keys, tmp_path, first):
    """Item 5: a model file failing its hash leaves /opt/llm, /etc and the state exactly as they were
    (the environment was already unpacked and verified: it waits in the staging tree, named in the error);
    the re-run with a good bundle copies only what was not verified yet."""
    if not first:
        install(root, bundles["v1"], keys)
    snap = _placed(root)
    bad = _flip(bundles["v2"], "models/tiny/model.safetensors", tmp_path / "bad")
    r = install(root, bad, keys, check=False)
    assert r.returncode == 1 and "models/tiny/model.safetensors: sha256 mismatch" in r.stderr, r.stderr
    assert "nothing under /opt/llm or /etc was changed" in r.stderr
    staging = root / "var/lib/llm/staging"
    assert _placed(root) == snap
    assert not list(staging.rglob("*partial*")), "no half-copied file is kept"
    if first:
        assert not (root / STATE_DIR / "state.json").exists(), "no state record of a refused install"
    log = staging / "models/tiny" / ("2" * 40) / ".llm-verified"
    kept = log.read_text().splitlines() if log.exists() else []
    # what was verified (the env of a first install, model files done before the bad one) waits, named
    assert (f"kept in {staging}" in r.stderr and "--clean" in r.stderr) == bool(first or kept), r.stderr
    assert all("model.safetensors" not in ln for ln in kept)
    r = install(root, bundles["v2"], keys)
    assert "environment t1" in r.stdout
    assert ("verified and unpacked by an earlier run (reused)" in r.stdout) == first, r.stdout
    if kept:
        assert f"model tiny: {len(kept)} of 3 files verified by an earlier run (kept)" in r.stdout
    assert f"model tiny: verifying and copying {3 - len(kept)} files" in r.stdout
    assert state(root)["lines"]["demo"]["active"].startswith("demo-1.1.0-")
    assert not staging.exists(), "a successful install leaves no staging tree"


def test_clean_removes_the_staging_tree(root, bundles, keys, tmp_path):
    bad = _flip(bundles["v1"], "models/tiny/config.json", tmp_path / "bad", offset=3)
    snap = _placed(root)
    r = install(root, bad, keys, check=False)
    assert r.returncode == 1 and "models/tiny/config.json: sha256 mismatch" in r.stderr
    assert (root / "var/lib/llm/staging").is_dir()
    clean(root)
    assert not (root / "var/lib/llm/staging").exists() and _placed(root) == snap


def test_install_sh_is_verified_before_it_is_kept(root, bundles, keys, tmp_path):
    """Item 2: the install.sh kept for llm-install (run as root later) is copied, then hashed against its
    MANIFEST entry like every other artifact."""
    import shutil

    boot = tmp_path / "boot"
    (boot / "installer").mkdir(parents=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "installer", boot / "installer" / "installer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (boot / "runtime").mkdir()  # install.sh's unpacked runtime (its content does not matter here)
    (boot / "runtime" / "marker").write_text("runtime\n")
    m = json.loads((bundles["v1"] / "MANIFEST.json").read_text())
    for rel in (m["installer"]["artifact"], m["runtime"]["artifact"]):  # what install.sh verified and unpacked
        (boot / "verified" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundles["v1"] / rel, boot / "verified" / rel)
    boot.chmod(0o700)
    bad = _flip(bundles["v1"], "install.sh", tmp_path / "bad", offset=40)
    snap = _placed(root)
    r = install(root, bad, keys, "--bootstrap", boot, check=False)
    assert r.returncode == 1 and "install.sh: sha256 mismatch" in r.stderr, r.stderr
    assert _placed(root) == snap
    install(root, bundles["v1"], keys, "--bootstrap", boot)
    kept = root / "opt/llm/installer/current/install.sh"
    assert kept.read_bytes() == (bundles["v1"] / "install.sh").read_bytes()
    assert os.access(kept, os.X_OK)
    assert (root / "usr/local/sbin/llm-install").is_file()


def test_damaged_model_in_use_is_replaced_never_deleted_first(root, bundles, keys, tmp_path):
    """Items 7 and 9: a model dir the active version uses is never rmtree'd; a damaged one (a file
    truncated, as after a power cut) is not reused by size or record: a verified copy is swapped in with
    one renameat2(RENAME_EXCHANGE)."""
    install(root, bundles["v1"], keys)
    mdir = root / "opt/llm/models/tiny" / ("1" * 40)
    w = mdir / "model.safetensors"
    good = w.read_bytes()
    fd = os.open(mdir, os.O_RDONLY)  # a process using the directory (like vLLM) keeps its handle
    try:
        with open(w, "r+b") as f:
            f.truncate(100)
        r = install(root, bundles["v1"], keys)
        assert "nothing changed" not in r.stdout
        assert w.read_bytes() == good
        assert os.stat(mdir).st_ino != os.fstat(fd).st_ino, "a new directory was swapped in"
    finally:
        os.close(fd)
    # an older state without hash records: a same-size corruption is found by a re-hash, not reused
    st_ = state(root)
    st_["objects"]["/opt/llm/models/tiny/" + "1" * 40].pop("digest")
    (root / STATE_DIR / "state.json").write_text(json.dumps(st_))
    data = bytearray(good)
    data[7] ^= 1
    w.unlink()
    w.write_bytes(bytes(data))
    r = install(root, bundles["v1"], keys)
    assert "model tiny: verifying and copying 3 files" in r.stdout
    assert w.read_bytes() == good


def test_a_directory_the_installer_did_not_create_is_not_touched(root, bundles, keys):
    mine = root / "opt/llm/models/tiny" / ("1" * 40)
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    snap = _placed(root)
    r = install(root, bundles["v1"], keys, check=False)
    assert r.returncode == 1 and f"/opt/llm/models/tiny/{'1' * 40} exists but was not created" in r.stderr
    assert _placed(root) == snap


def test_second_installer_waits_then_refuses(root, bundles, keys):
    with Lock(root, timeout=1):
        t = time.monotonic()
        r = install(root, bundles["v1"], keys, "--lock-timeout", "2", check=False)
        assert time.monotonic() - t >= 2
    assert r.returncode != 0 and "another installer is running" in r.stderr and str(os.getpid()) in r.stderr
    assert not (root / "opt").exists()
    assert (root / STATE_DIR / LOCK_FILE).exists()


@pytest.mark.slow
def test_install_killed_mid_extraction_keeps_previous_version(
    root, bundles, keys, built_env, tmp_path, keys2=None
):
    install(root, bundles["v1"], keys)
    big = env_parts(built_env, tmp_path / "big", pad_bytes=400 << 20, salt="v2")
    b = make_bundle(
        tmp_path / "out",
        BundleSpec(version="1.5.0", env=big, models=[tiny_model(commit="5" * 40)], services=[service()]),
        keys,
    )
    envs = root / "var/lib/llm/staging/envs/t1"  # environments are unpacked in the staging tree
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "installer",
            "install",
            "--bundle",
            str(b),
            "--root",
            str(root),
            "--pubkey",
            str(keys.pub),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not list(envs.glob(".*.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "extraction never started"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(envs.glob(".*.partial-*")), "killed while extracting"
    s = state(root)["lines"]["demo"]
    assert s["active"].startswith("demo-1.0.0-") and not s.get("previous")
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "1" * 40
    # the next run cleans up and finishes
    r = install(root, b, keys)
    assert "left by an interrupted install" in r.stdout
    assert not envs.exists()
    assert state(root)["lines"]["demo"]["active"].startswith("demo-1.5.0-")


@pytest.mark.parametrize(
    ("a", "b", "cmp"),
    [
        ("2026.11.21", "2026.11.3", 1),
        ("2026.11.21", "2026.11.21", 0),
        ("1.2.0", "1.10.0", -1),
        ("1.2.0-rc.1", "1.2.0", -1),
        ("1.2.0", "1.2", 0),
        ("v1.3", "1.2.9", 1),
        ("1.0.0+build5", "1.0.0", 0),
        ("1.0.0-rc.2", "1.0.0-rc.10", -1),
    ],
)
def test_version_order(a, b, cmp):
    assert compare_versions(a, b) == cmp and compare_versions(b, a) == -cmp


def test_bad_shard_stops_the_copy_at_once(root, tmp_path, t1_parts, keys):
    """Item 11: the first file failing its hash ends the copy; the files not started yet are never copied."""
    shards = {f"model-{i:05d}-of-00006.safetensors": os.urandom((8 - i) << 20) for i in range(6)}
    m = tiny_model(commit="6" * 40)
    m.files.update(shards)
    b = make_bundle(tmp_path / "out", BundleSpec(version="1.0.0", env=t1_parts, models=[m], services=[service()]),
                    keys)
    bad = _flip(b, "models/tiny/model-00000-of-00006.safetensors", tmp_path / "bad")  # the biggest: first
    r = install(root, bad, keys, "--workers", "1", check=False)
    assert r.returncode == 1 and "model-00000-of-00006.safetensors: sha256 mismatch" in r.stderr, r.stderr
    staged = root / "var/lib/llm/staging/models/tiny" / ("6" * 40)
    copied = [p.name for p in staged.rglob("*") if p.is_file()]
    print(f"files copied before the refusal: {copied}")
    assert copied == [], "nothing after the bad shard was copied"


def test_failed_check_after_the_switch_rolls_back(root, bundles, keys):
    """Item 6: what the installer does when the new version fails its post-start check (on a live server):
    one switch back to the version that was active, the new one's files dropped, the previous kept."""
    from installer.deploy.placement import Installer
    from installer.deploy.switch import roll_back_failed

    install(root, bundles["v1"], keys)
    old_line = dict(state(root)["lines"]["demo"])
    install(root, bundles["v2"], keys)
    new = state(root)["lines"]["demo"]["active"]
    said: list[str] = []
    inst = Installer(root, said.append)
    roll_back_failed(inst, "demo", new, old_line, said.append)
    s = state(root)
    assert s["lines"]["demo"]["active"] == old_line["active"] and s["lines"]["demo"]["previous"] is None
    assert new not in s["bundles"]
    assert os.readlink(root / "etc/llm/lines/demo") == f"../versions/{old_line['active']}"
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "1" * 40
    assert not (root / "opt/llm/models/tiny" / ("2" * 40)).exists()
    assert not (root / "etc/llm/versions" / new).exists()
    assert any("rolling back to 1.0.0" in t for t in said), said
