"""The multi-node test's bundle: the tiny model served by one service spanning two nodes over Ray
(``nodes: 2``, ``pipeline_parallel_size: 2``), in the journey's vLLM CPU environment plus Ray.

Built with `pack build` and kept in the test cache keyed by its inputs, so a re-run builds nothing.
``python -m devkit.multinode`` builds it and prints where it is.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from devkit.conda_channel.channel import default_cache_dir, ensure_test_channel
from devkit.journey import ROOT, SERVICE, pack_cmd, vllm_work_dir, write_manifest
from devkit.tiny_model import make_tiny_model

RAY_PIP = "ray[default]==2.60.0"
RAY_PORT = 6379
API_PORT = 8000


@dataclass
class MultiNodeBundle:
    bundle: Path
    pub: Path
    manifest: Path


def write_multinode_manifest(path: Path, *, channel: Path, model: Path, version: str = "1.0.0") -> None:
    write_manifest(path, channel=channel, model={"source": "local", "path": str(model)}, version=version)
    doc = yaml.safe_load(path.read_text())
    doc["bundle"]["name"] = "tiny-cluster"
    doc["bundle"]["description"] = "the tiny model over a two-node Ray cluster (vLLM CPU build)"
    env = doc["environments"][0]
    env["name"] = "vllm-ray"
    env["pip"]["packages"] = [*env["pip"]["packages"], RAY_PIP]
    svc = doc["services"][0]
    svc.update({"environment": "vllm-ray", "host": "0.0.0.0", "port": API_PORT, "nodes": 2,
                "pipeline_parallel_size": 2, "ray": {"port": RAY_PORT, "wait_s": 300}})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _key() -> str:
    h = hashlib.sha256()
    for f in ("devkit/journey.py", "devkit/multinode.py", "devkit/tiny_model.py", "packager/build.py",
              "packager/bundle_writer.py", "installer/bootstrap/install.sh"):
        h.update((ROOT / f).read_bytes())
    for p in sorted((ROOT / "installer").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_multinode_bundle(log=print) -> MultiNodeBundle:
    base = default_cache_dir() / "multinode-bundle"
    base.mkdir(parents=True, exist_ok=True)
    work = base / _key()
    done = MultiNodeBundle(work / "out" / "tiny-cluster-1.0.0", work / "keys" / "build.pub", work / "tiny.yaml")
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (work / "done").is_file():
            return done
        for stale in base.iterdir():  # older builds of other inputs: one is kept
            if stale.is_dir() and stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_CACHE=str(work / "cache"),
                   LLM_PACK_WORK=str(vllm_work_dir()), HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf"))
        model = make_tiny_model(work / "tiny-model")
        (work / "keys").mkdir()
        pack_cmd(["keygen", "--out", str(work / "keys" / "build")], env, log)
        write_multinode_manifest(done.manifest, channel=ensure_test_channel(), model=model)
        pack_cmd(["build", str(done.manifest), "--key", str(work / "keys" / "build.key"), "--out",
                  str(work / "out"), "--no-progress"], env, log)
        shutil.rmtree(work / "cache", ignore_errors=True)
        (work / "done").write_text("ok\n")
    return done


if __name__ == "__main__":
    b = ensure_multinode_bundle()
    print(f"{b.bundle}\n{b.pub}")
    assert SERVICE == "tiny"
