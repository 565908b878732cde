"""Build the GPU-path bundle for a server whose vLLM is already installed (``existing:``), cut for carrying.

`python -m devkit.gpu_bundle OUT [--volume-size 45M]` writes, with the real `pack` CLI:
  OUT/gpu.yaml                 the manifest (below)
  OUT/keys/build.{key,pub}     a signing key made for this bundle (pack keygen)
  OUT/out/gpu-tiny-1.0.0/      the signed bundle
  OUT/volumes/vol01..          the bundle split into volumes small enough to carry one per call

The manifest: a generated tiny Qwen2 model in the GPU shape (head_dim 64), a small packed environment from the
test channel (its interpreter becomes the installer runtime, so the server needs no Python of its own), the
server's existing vLLM environment (``existing: /opt/vllm-venv``, CUDA 13.0) and one GPU service on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devkit.journey import host_glibc, pack_cmd

SERVICE = "tiny-gpu"
PORT = 8000
EXISTING = "/opt/vllm-venv"


def write_manifest(path: Path, *, channel: Path, model_dir: Path, existing: str = EXISTING) -> None:
    import yaml

    doc = {
        "bundle": {"name": "gpu-tiny", "version": "1.0.0",
                   "description": "GPU path: a tiny generated model served by the server's own CUDA vLLM"},
        "target": {"platform": "linux-64", "glibc": host_glibc()},
        "environments": [
            {"name": "installer-py", "python": f"{sys.version_info.major}.{sys.version_info.minor}",
             "channels": [channel.as_uri()], "conda": ["python"]},
            {"name": "site", "existing": existing, "cuda": "13.0"},
        ],
        "models": [{"name": "tiny", "source": "local", "path": str(model_dir)}],
        "services": [{
            "name": SERVICE, "model": "tiny", "environment": "site", "served_model_name": "tiny",
            "port": PORT, "gpus": [0], "max_model_len": 512, "dtype": "bfloat16", "gpu_memory_utilization": 0.3,
            # the lent GPU machines share NVLink fabric with others: multicast stays off in every process
            "env": {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"},
        }],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    from devkit.conda_channel.channel import ensure_test_channel
    from devkit.tiny_model import make_tiny_model

    ap = argparse.ArgumentParser(prog="python -m devkit.gpu_bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--volume-size", default="45M", help="largest volume (default 45M: one per device call)")
    ap.add_argument("--existing", default=EXISTING, help=f"the server's vLLM environment (default {EXISTING})")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), LLM_PACK_CACHE=str(out / "cache"),
               LLM_PACK_WORK=str(out / "envs"))
    model = make_tiny_model(out / "tiny-gpu-model", gpu=True)
    manifest = out / "gpu.yaml"
    write_manifest(manifest, channel=ensure_test_channel(), model_dir=model, existing=a.existing)
    keys = out / "keys"
    keys.mkdir(exist_ok=True)
    if not (keys / "build.key").exists():
        pack_cmd(["keygen", "--out", str(keys / "build")], env, print)
    pack_cmd(["build", str(manifest), "--key", str(keys / "build.key"), "--out", str(out / "out"),
              "--no-progress"], env, print)
    bundle = out / "out" / "gpu-tiny-1.0.0"
    pack_cmd(["verify", str(bundle), "--pubkey", str(keys / "build.pub")], env, print)
    pack_cmd(["split", str(bundle), "--size", a.volume_size, "--out", str(out / "volumes")], env, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
