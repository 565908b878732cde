"""R5 resource faults, installer side: the disk fills up while the environment is unpacked and while a model
is copied (a size-limited tmpfs as the target root), the bundle's medium goes away mid-copy (the file being
copied is truncated under the installer), and Ctrl-C (SIGINT) mid-install.

Each: a clean error (exit code, one message saying what and where, no traceback), /opt/llm, /etc and the
state exactly as they were, and a re-run that works without copying again what was already verified.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.faults.ctrl_c import default_sigint
from tests.installer_fixtures import (
    INSTALLER_PKG,
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    run_command,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)"),
]
BIG = 96 << 20  # the model file the faults hit while it is being copied


def cmd(root: Path, bundle: Path, keys) -> list:
    return [sys.executable, "-m", "installer", "install", "--bundle", bundle, "--root", root, "--pubkey", keys.pub]


def install(root: Path, bundle: Path, keys, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command([*cmd(root, bundle, keys), *extra], check=check, timeout=300, cwd=INSTALLER_PKG.parent)


# the preflight's disk check refuses a target this small before anything is written (that is its job);
# skipped here so that the disk really fills up under the installer (another process could fill it too)
SKIP_DISK = ("--skip-check", "disk")


def placed(root: Path) -> dict:
    """What must not change: /opt/llm, /etc and the state file."""
    snap = {k: v for k, v in tree_snapshot(root).items() if k.split("/")[0] in ("opt", "etc")}
    sp = root / "var/lib/llm/state.json"
    snap["<state>"] = sp.read_text() if sp.exists() else None
    return snap


def clean_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory, t1_parts, keys):
    model = tiny_model(commit="4" * 40, weights=os.urandom(BIG))
    out = tmp_path_factory.mktemp("r5")
    b = make_bundle(out, BundleSpec(version="1.0.0", env=t1_parts, models=[model], services=[service()]), keys)
    return b


def fresh_root(base: Path) -> Path:
    (base / "etc").mkdir(parents=True, exist_ok=True)
    (base / "etc/hostname").write_text("server\n")
    return base


def mib(n: int) -> str:
    return f"{n}m"


def env_size(bundle: Path) -> int:
    import json

    m = json.loads((bundle / "MANIFEST.json").read_text())
    return int(m["environments"][0]["unpacked_size"])


def test_disk_full_during_env_unpack_then_during_model_copy(tmp_path, big_bundle, keys):
    figures = []
    need_env = env_size(big_bundle) >> 20
    with tmpfs(tmp_path / "t", mib(max(4, need_env // 3))) as mnt:
        root = fresh_root(mnt / "root")
        snap = placed(root)
        r = install(root, big_bundle, keys, *SKIP_DISK, check=False)
        clean_error(r, 1, "the disk is full (No space left on device)", "free space there",
                    "nothing under /opt/llm or /etc was changed")
        assert "while unpacking envs/t1.tar.zst into" in r.stderr, r.stderr
        assert placed(root) == snap
        figures.append("env unpack: refused, unchanged")

        # room for the environment (and its staged copy) but not for the big model file
        resize(mnt, mib(need_env + 16 + (BIG >> 21)))
        r = install(root, big_bundle, keys, *SKIP_DISK, check=False)
        clean_error(r, 1, "install failed while copying model tiny into", "the disk is full",
                    "nothing under /opt/llm or /etc was changed", "--clean")
        assert placed(root) == snap
        assert not list((root / "var/lib/llm/staging").rglob("*.partial*")), "no half file kept"
        figures.append("model copy: refused, unchanged")

        resize(mnt, mib(need_env + 64 + 2 * (BIG >> 20)))
        r = install(root, big_bundle, keys)
        assert "environment t1: verified and unpacked by an earlier run (reused)" in r.stdout, r.stdout
        assert (root / "etc/llm/tiny.env").exists()
        figures.append("re-run: env reused")
    print(f"R5 disk full: {figures}")
    assert len(figures) == 3


def _start_and_stop_mid_copy(root: Path, bundle: Path, keys) -> subprocess.Popen:
    """Start an install and freeze it (SIGSTOP) while the big model file is being copied."""
    proc = subprocess.Popen([str(c) for c in cmd(root, bundle, keys)], cwd=INSTALLER_PKG.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    stage = root / "var/lib/llm/staging/models/tiny" / ("4" * 40)
    partial = stage / ".model.safetensors.partial"
    deadline = time.monotonic() + 120
    while True:
        if partial.exists() and 0 < partial.stat().st_size < BIG // 2:
            proc.send_signal(signal.SIGSTOP)
            if partial.exists():
                return proc
            proc.send_signal(signal.SIGCONT)
        assert proc.poll() is None, f"the install ended before the copy was caught: {proc.communicate()}"
        assert time.monotonic() < deadline, "the model copy never started"
        time.sleep(0.0005)


def _verified(root: Path) -> dict[str, int]:
    """Staged files the installer logged as verified, with their inode (a re-copy would change it)."""
    stage = root / "var/lib/llm/staging/models/tiny" / ("4" * 40)
    log = stage / ".llm-verified"
    names = [ln.split(" ", 2)[2] for ln in log.read_text().splitlines()] if log.exists() else []
    return {n: (stage / n).stat().st_ino for n in names}


@pytest.mark.parametrize("fault", ["medium-gone", "sigint"])
def test_medium_gone_or_ctrl_c_mid_copy(tmp_path, big_bundle, keys, fault):
    bundle = tmp_path / "medium" / big_bundle.name
    shutil.copytree(big_bundle, bundle)
    weights = bundle / "models/tiny/model.safetensors"
    good = weights.read_bytes()
    weights.unlink()  # a file of its own (not a hard link into the fixture)
    weights.write_bytes(good)
    root = fresh_root(tmp_path / "root")
    snap = placed(root)
    proc = _start_and_stop_mid_copy(root, bundle, keys)
    if fault == "medium-gone":
        with open(weights, "r+b") as f:
            f.truncate(BIG // 4)  # what the reader sees of a yanked disk: the data stops
        proc.send_signal(signal.SIGCONT)
    else:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if fault == "medium-gone":
        clean_error(r, 1, "models/tiny/model.safetensors: size mismatch", "nothing under /opt/llm or /etc")
    else:
        clean_error(r, 130, "interrupted")
        assert "nothing under /opt/llm or /etc was changed" in r.stdout + r.stderr
    assert placed(root) == snap
    kept = _verified(root)
    if fault == "medium-gone":
        assert "model.safetensors" not in kept
    if fault == "medium-gone":
        weights.unlink()
        weights.write_bytes(good)  # the medium is back
    r = install(root, bundle, keys)
    assert "environment t1: verified and unpacked by an earlier run (reused)" in r.stdout, r.stdout
    final = root / "opt/llm/models/tiny" / ("4" * 40)
    for name, ino in kept.items():
        assert (final / name).stat().st_ino == ino, f"{name} was copied again"
    if len(kept) < 3:
        assert f"verifying and copying {3 - len(kept)} files" in r.stdout
    else:  # the copy under way when Ctrl-C came was finished (and verified) before the installer stopped
        assert "model tiny: verified by an earlier run (reused)" in r.stdout
    assert (final / "model.safetensors").stat().st_size == BIG
    print(f"R5 {fault}: refused cleanly, unchanged; re-run reused the env and {len(kept)} verified file(s)")


def test_opt_llm_on_its_own_filesystem(tmp_path, big_bundle, keys):
    """/opt/llm a separate mount (staging under /var/lib/llm cannot be renamed there): placed by a copy
    beside the final path, then one rename; the environment still has its final prefix baked in."""
    root = fresh_root(tmp_path / "root")
    with tmpfs(root / "opt/llm", "1g"):
        install(root, big_bundle, keys)
        import json

        st = json.loads((root / "var/lib/llm/state.json").read_text())
        env = st["bundles"][st["lines"]["demo"]["active"]]["envs"]["t1"]
        out = subprocess.run([root / env.lstrip("/") / "bin/llmtest-prefix"], capture_output=True, text=True,
                             check=False).stdout
        assert out == f"prefix={env}\n"
        w = root / "opt/llm/models/tiny" / ("4" * 40) / "model.safetensors"
        assert w.stat().st_size == BIG and not (root / "var/lib/llm/staging").exists()
        assert not list((root / "opt/llm").rglob(".*partial*"))
        run_command([sys.executable, "-m", "installer", "uninstall", "--root", root], check=True, timeout=120,
                    cwd=INSTALLER_PKG.parent)
        assert list((root / "opt/llm").iterdir()) == []
    print("R5 separate /opt/llm filesystem: installed by copy+rename, uninstalled")
