"""The two bundles of the fleet test: tiny-demo 1.0.0 and 1.0.1 (same vLLM CPU environment, same model; the
upgrade is a new version only). Built with `pack build` from the journey's manifest and the shared cached
vLLM environment (devkit/journey.py), kept in the test cache keyed by the inputs, so a re-run builds nothing."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from devkit.conda_channel.channel import default_cache_dir, ensure_test_channel
from devkit.journey import ROOT, pack_cmd, vllm_work_dir, write_manifest
from devkit.tiny_model import make_tiny_model


@dataclass
class FleetBundles:
    v1: Path
    v2: Path
    pub: Path


def _key() -> str:
    h = hashlib.sha256()
    for f in ("devkit/journey.py", "devkit/tiny_model.py", "packager/build.py", "packager/bundle_writer.py",
              "installer/bootstrap/install.sh"):
        h.update((ROOT / f).read_bytes())
    for d in ("installer",):
        for p in sorted((ROOT / d).rglob("*.py")):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_fleet_bundles(log=print) -> FleetBundles:
    base = default_cache_dir() / "fleet-bundles"
    base.mkdir(parents=True, exist_ok=True)
    work = base / _key()
    done = FleetBundles(work / "out" / "tiny-demo-1.0.0", work / "out" / "tiny-demo-1.0.1", work / "keys" / "build.pub")
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (work / "done").is_file():
            return done
        for stale in base.iterdir():  # older builds of other inputs: one set is kept
            if stale.is_dir() and stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_CACHE=str(work / "cache"),
                   LLM_PACK_WORK=str(vllm_work_dir()), HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf"))
        model = make_tiny_model(work / "tiny-model")
        channel = ensure_test_channel()
        (work / "keys").mkdir()
        pack_cmd(["keygen", "--out", str(work / "keys" / "build")], env, log)
        for version in ("1.0.0", "1.0.1"):
            m = work / f"tiny-{version}.yaml"
            write_manifest(m, channel=channel, model={"source": "local", "path": str(model)}, version=version)
            pack_cmd(["build", str(m), "--key", str(work / "keys" / "build.key"), "--out", str(work / "out"),
                      "--no-progress"], env, log)
        shutil.rmtree(work / "cache", ignore_errors=True)
        (work / "done").write_text("ok\n")
    return done
