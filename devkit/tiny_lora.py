"""A tiny LoRA adapter of the tiny model (devkit/tiny_model.py), generated with the real ``peft``.

``make_tiny_lora(dest, base_dir)`` writes a peft adapter directory (``adapter_config.json``,
``adapter_model.safetensors``) for ``q_proj``/``v_proj`` of every layer, rank ``RANK``, its weights random
from a seed (``init_lora_weights=False``: a default LoRA starts with B = 0 and would not change a token).
peft needs torch, which the project's own venv does not carry (PyPI has only multi-GB CUDA builds); the
vLLM CPU environment the tests build has torch and transformers, so peft is installed into a small venv
on top of it (``--system-site-packages``, cached in the test cache) and the generator runs there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PEFT_PIP = "peft==0.21.2"
RANK = 8
TARGETS = ("q_proj", "v_proj")


def peft_python() -> Path:
    """A python with torch, transformers and peft: the vLLM CPU environment plus peft (built once)."""
    from devkit.conda_channel.channel import default_cache_dir
    from devkit.journey import ensure_vllm_env

    venv = default_cache_dir() / f"peft-venv-{PEFT_PIP.split('==')[1]}"
    py = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return py
    base = ensure_vllm_env() / "bin" / "python"
    subprocess.run([str(base), "-m", "venv", "--clear", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run([str(py), "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "-q",
                    PEFT_PIP], check=True, env=env)
    (venv / ".complete").write_text(PEFT_PIP + "\n")
    return py


def make_tiny_lora(dest: Path, base_dir: Path, *, seed: int = 0, rank: int = RANK,
                   base_name: str = "demo/tiny-qwen2") -> Path:
    """Write the adapter of the model in ``base_dir`` to ``dest``; ``base_name`` is what its
    adapter_config.json names as the base (a repo id, not a build-host path)."""
    dest = Path(dest)
    if (dest / "adapter_config.json").exists() and (dest / "adapter_model.safetensors").exists():
        cfg = json.loads((dest / "adapter_config.json").read_text())
        if cfg.get("r") == rank:
            return dest
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    subprocess.run([str(peft_python()), str(Path(__file__).resolve()), "--generate", str(dest), str(base_dir),
                    str(seed), str(rank), base_name], check=True, env=env)
    (dest / "README.md").unlink(missing_ok=True)  # peft's model-card template: not part of the adapter
    return dest


def _generate(dest: str, base_dir: str, seed: int, rank: int, base_name: str) -> None:
    """Runs in :func:`peft_python`: load the model with transformers, wrap it with peft, save the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(dest)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--generate":
        _generate(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        print("usage: python -m devkit.tiny_lora DEST BASE_MODEL_DIR", file=sys.stderr)
        if len(sys.argv) == 3:
            print(make_tiny_lora(Path(sys.argv[1]), Path(sys.argv[2])))
        else:
            sys.exit(2)
