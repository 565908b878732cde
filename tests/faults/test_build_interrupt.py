"""R5: Ctrl-C (SIGINT) during a real `pack build` subprocess.

The manifest has a hub model (fetched into the content store from the loopback hub) and a local model with a
large sparse weight file, so the build spends seconds in its one hashing pass over what it is about to sign
(after fetching, after placing). SIGINT arrives there, at several moments. Each time: exit 130, the
"interrupted" message, no traceback, the output directory exactly as before (nothing at the final path, no
staging left; a previous bundle untouched), and the process ends promptly (no hashing thread keeps it
alive). The re-run completes without fetching anything again (the store kept the verified download) and the
bundle verifies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.tiny_model import make_tiny_model
from tests.faults.ctrl_c import default_sigint

pytest_plugins = ("tests.hub.fixtures",)
ROOT = Path(__file__).resolve().parents[2]
BIG = 3 << 30  # sparse: no disk, but every byte is read and hashed (~1.5-3 s on this machine)


def _pack(*args: str, env: dict) -> list[str]:
    return [sys.executable, "-m", "packager.cli", *args]


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (mode, size, mtime, inode): cheap enough for a 3 GiB sparse file, and any change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _staging_with(out: Path, rel: str) -> bool:
    return any((d / rel).exists() for d in out.glob(".intr-1.*.partial"))


def _interrupt_while_hashing(cmd: list[str], env: dict, out: Path, delay: float) -> tuple[int, str, float]:
    """Start the build, wait until its staging directory holds the big file (the hash pass starts right
    after placing), wait ``delay`` more, send SIGINT; (exit code, stderr, seconds from SIGINT to exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not _staging_with(out, "models/local/big.safetensors"):
        if proc.poll() is not None or time.monotonic() > deadline:
            so, se = proc.communicate()
            pytest.fail(f"the build ended (or stalled) before it reached the hash pass: {so}{se}")
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the build finished before the interrupt: make BIG larger"
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - t


def test_sigint_during_pack_build_leaves_nothing_and_a_rerun_reuses_the_store(tmp_path: Path, hub, hub_env) -> None:
    tiny = make_tiny_model(tmp_path / "tiny")
    hub.add_repo_from_dir("demo/tiny", tiny)
    local = tmp_path / "local"
    local.mkdir()
    make_tiny_model(local, seed=1)
    with open(local / "big.safetensors", "wb") as f:
        f.truncate(BIG)
    m = tmp_path / "m.yaml"
    m.write_text("bundle: {name: intr, version: '1'}\nmodels:\n"
                 f"  - {{name: hub, source: huggingface, repo: demo/tiny, revision: main, endpoint: '{hub.url}'}}\n"
                 f"  - {{name: local, source: local, path: {local}}}\n")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "packager.cli", "keygen", "--out", str(tmp_path / "k")], check=True,
                   cwd=ROOT, capture_output=True)
    env = {**os.environ, "LLM_PACK_STORE": str(tmp_path / "store"), "PYTHONPATH": str(ROOT)}
    cmd = _pack("build", str(m), "--key", str(tmp_path / "k.key"), "--out", str(out), "--no-progress", "-j", "2",
                env=env)

    tried = clean = 0
    for delay in (0.0, 0.3, 0.8):  # first build: nothing at the final path before, nothing after
        before = _tree(out)
        rc, err, secs = _interrupt_while_hashing(cmd, env, out, delay)
        tried += 1
        assert rc == 130, err
        assert "interrupted: nothing was left half-written" in err and "Traceback" not in err, err
        assert _tree(out) == before, f"SIGINT {delay}s into the hash pass changed {out}"
        assert secs < 10, f"{secs:.1f}s from SIGINT to exit"
        clean += 1
    downloads = hub.total_downloads()
    assert downloads > 0, "the interrupted builds fetched the hub model into the store"

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert hub.total_downloads() == downloads, "the re-run fetched again what the store had verified"
    bundle = out / "intr-1"
    v = subprocess.run(_pack("verify", str(bundle), "--pubkey", str(tmp_path / "k.pub"), env=env), cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

    # a rebuild over the finished bundle, interrupted: the previous bundle stays exactly as it was
    os.utime(local / "big.safetensors", ns=(1, 1))  # new stat: hashed again, so the pass takes its seconds
    before = _tree(out)
    rc, err, _ = _interrupt_while_hashing(cmd, env, out, 0.3)
    tried += 1
    assert rc == 130 and "Traceback" not in err, err
    assert _tree(out) == before
    clean += 1
    v = subprocess.run(_pack("verify", str(bundle), "--pubkey", str(tmp_path / "k.pub"), env=env), cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    print(f"R5 SIGINT during pack build: {tried} interrupts tried, {clean} clean (exit 130, --out unchanged), "
          f"re-run fetched {hub.total_downloads() - downloads} files again and verified")
    assert tried == clean == 4
