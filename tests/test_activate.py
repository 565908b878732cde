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

from installer.state import LOCK_FILE, STATE_DIR, Lock, compare_versions
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
    from installer.systemd import parse_env_file

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
    repo = root / "opt/llm/hf-cache/hub/models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    assert (repo / "refs" / "main").read_text() == "a" * 40
    real = root / "opt/llm/models/hfm" / ("a" * 40) / "model.safetensors"
    assert (snap / "model.safetensors").is_symlink()
    assert (snap / "model.safetensors").resolve() == real.resolve()
    assert (snap / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"
    e = env_file(root, "hfsvc")
    assert e["LLM_MODEL"] == "acme/tiny" and e["HF_HUB_CACHE"] == "/opt/llm/hf-cache/hub"
    # a bundle without environment or runtime: its service runs on the env installed above
    install(root, bundles["models-only"], keys)
    e2 = env_file(root, "m2svc")
    assert e2["LLM_ENV_PREFIX"] == e["LLM_ENV_PREFIX"] if "LLM_ENV_PREFIX" in e else True
    st = state(root)
    assert set(st["lines"]) == {"hfdemo", "extra"}
    env_path = st["bundles"][st["lines"]["hfdemo"]["active"]]["envs"]["t1"]
    assert env_path in json.dumps(e2)
    # uninstalling the env's bundle alone keeps what the other bundle still uses
    run_installer("uninstall", "--root", root, "--name", "hfdemo")
    assert (root / env_path.lstrip("/") / "bin").is_dir()
    run_installer("uninstall", "--root", root)
    assert not (root / "opt").exists() and not (root / "var").exists()


def test_corrupt_model_file_refused_nothing_activated(root, bundles, keys, tmp_path):
    install(root, bundles["v1"], keys)
    snap = tree_snapshot(root)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundles["v2"], bad / bundles["v2"].name)
    w = bad / bundles["v2"].name / "models/tiny/model.safetensors"
    data = bytearray(w.read_bytes())
    data[100] ^= 1
    w.write_bytes(bytes(data))
    r = install(root, bad / bundles["v2"].name, keys, check=False)
    assert r.returncode != 0 and "models/tiny/model.safetensors: sha256 mismatch" in r.stderr
    assert state(root)["lines"]["demo"]["active"].startswith("demo-1.0.0-")
    assert env_file(root)["LLM_MODEL"] == "/opt/llm/models/tiny/" + "1" * 40
    # the bundle record of the failed attempt is the only thing added; no model dir, no partial left
    assert not (root / "opt/llm/models/tiny" / ("2" * 40)).exists()
    assert not list((root / "opt/llm/models/tiny").glob(".*partial*"))
    assert {k for k in tree_snapshot(root) if k not in snap} <= {
        k for k in tree_snapshot(root) if k.startswith("var/lib/llm/bundles/demo-1.1.0-")
    } | {"var/lib/llm/bundles"}


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
    envs = root / "opt/llm/envs/t1"
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
    assert not list(envs.glob(".*.partial-*"))
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
