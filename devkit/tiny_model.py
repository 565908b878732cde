"""A tiny, generated, servable chat model for tests and the built-in demo.

`make_tiny_model(dest)` writes a Hugging Face-format model directory (Qwen2ForCausalLM, random bf16
weights, a byte-level BPE tokenizer with a ChatML chat template) that the real vLLM CPU build can serve.
It is never downloaded: everything is generated from a seed, and the same seed gives byte-identical files.

Shape choices that matter for vLLM: ``head_dim`` is 32 because the vLLM CPU attention backend refuses 16
(the server passes /health and then dies on the first request); ``vocab_size`` equals the tokenizer's size
exactly so every id the model can sample decodes to text. ``gpu=True`` writes the GPU shape instead
(``GPU_HEADS``: 2 heads of 64, the head size FlashAttention 3 takes on Hopper).

Only numpy and `tokenizers` are needed (no torch): safetensors is a JSON header plus raw little-endian bytes,
and bfloat16 is the upper half of float32 (rounded to nearest even).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32  # vLLM CPU attention refuses 16
# (num_attention_heads, num_key_value_heads, head_dim) for GPUs: FlashAttention 3 on Hopper takes head_dim 64
# (not 32); 2 x 64 keeps hidden_size = heads x head_dim, which vLLM's Qwen2 assumes
GPU_HEADS = (2, 1, 64)
INTERMEDIATE_SIZE = 256
VOCAB_TARGET = 512  # tokenizer size including the special tokens
MAX_POSITIONS = 2048
INIT_STD = 0.02  # embeddings
LAYER_STD = 0.07  # attention and MLP: large enough that the next token is not just the last one
CLASS_SCALE = 0.3  # embedding channel 0: +/- this for printable / other tokens
CLASS_GAIN = 20.0  # final norm weight on channel 0

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Qwen2.5-style ChatML, without tool calling. A default system turn is added when none is given.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# The text the tokenizer is trained on. Plain ASCII prose about the thing this tool does; the byte-level
# alphabet is always complete, so any input text still tokenizes.
TRAINING_TEXT = """\
The air gapped server has no network at all. Everything it needs arrives on one signed bundle: the
environment with its Python and vLLM, the model weights, the tokenizer and the installer script.
The operator copies the volumes from the removable disk, checks the signature with the trusted key,
and runs the installer. It verifies every file before it unpacks anything, checks the driver, the
GPUs, the memory and the disk, and then registers one service for each model.
A service starts the OpenAI compatible server and answers chat completions on a local port.
Hello! How are you today? I am fine, thank you. What can I do for you? Tell me a short story about
a small model that lived on a quiet machine far from the internet. Once upon a time there was a tiny
language model. It knew only a few hundred words, but it answered every question with great care.
It spoke about the weather, the mountains, the rivers and the sea; about numbers such as one, two,
three, four, five, six, seven, eight, nine and ten; about colours like red, green, blue, yellow,
orange, purple, black and white. Every morning the model woke up, read its configuration, loaded
its weights into memory and waited for requests. When a request came, it wrote a reply token by token
until it reached the end of the turn. The user was happy, the server was quiet, and the logs were clean.
Questions, answers, prompts, replies, messages, assistants, systems and users: these are the words of
a conversation. Keep the keys safe, verify the hashes, and never trust an unsigned bundle.
"""


def _tokenizer_json() -> str:
    """Train a byte-level BPE tokenizer on TRAINING_TEXT and return its tokenizer.json text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's split, the pre-tokenizer transformers' Qwen2Tokenizer installs, so every loader agrees.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    # Re-serialise through json with sorted keys so the file does not depend on map iteration order.
    return json.dumps(json.loads(tok.to_str()), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _bf16_bytes(a: np.ndarray) -> bytes:
    """float32 array -> little-endian bfloat16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2").tobytes()


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode), inverted: alphabet character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def _token_classes(tokenizer_text: str, vocab_size: int) -> np.ndarray:
    """Per token id: +1 if it decodes to printable ASCII (or newline), -1 otherwise, 0 for special tokens."""
    decoder = _byte_decoder()
    vocab: dict[str, int] = json.loads(tokenizer_text)["model"]["vocab"]
    classes = np.full(vocab_size, -1.0, dtype=np.float32)
    for token, token_id in vocab.items():
        raw = bytes(decoder[c] for c in token)
        if all(0x20 <= b < 0x7F or b == 0x0A for b in raw):
            classes[token_id] = 1.0
    for special in SPECIAL_TOKENS:
        classes[SPECIAL_TOKENS.index(special)] = 0.0
    return classes


def _weights(token_classes: np.ndarray, seed: int, heads: tuple[int, int, int] = (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM),
             ) -> dict[str, tuple[list[int], np.ndarray]]:
    """Random Qwen2 weights (float32 here; written as bf16), in a fixed order.

    One deliberate, non-random detail keeps the demo's output readable: hidden channel 0 carries each token's
    class (printable or not). The layers neither read it (zero norm weight) nor write it (zero output rows),
    and the final norm amplifies it, so through the tied embeddings a printable token is followed by
    printable tokens rather than stray bytes that decode to U+FFFD.
    """
    rng = np.random.default_rng(seed)
    vocab_size = len(token_classes)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)

    def layer(*shape: int) -> np.ndarray:
        return rng.normal(0.0, LAYER_STD, size=shape).astype(np.float32)

    def norm(*, channel0: float) -> np.ndarray:
        w = np.ones(HIDDEN_SIZE, dtype=np.float32)
        w[0] = channel0
        return w

    q_out, kv_out = heads[0] * heads[2], heads[1] * heads[2]
    w: dict[str, np.ndarray] = {}
    embed = normal(vocab_size, HIDDEN_SIZE)
    embed[:, 0] = CLASS_SCALE * token_classes
    w["model.embed_tokens.weight"] = embed
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(channel0=0.0)
        w[p + "self_attn.q_proj.weight"] = layer(q_out, HIDDEN_SIZE)
        w[p + "self_attn.q_proj.bias"] = layer(q_out)
        w[p + "self_attn.k_proj.weight"] = layer(kv_out, HIDDEN_SIZE)
        w[p + "self_attn.k_proj.bias"] = layer(kv_out)
        w[p + "self_attn.v_proj.weight"] = layer(kv_out, HIDDEN_SIZE)
        w[p + "self_attn.v_proj.bias"] = layer(kv_out)
        o_proj = layer(HIDDEN_SIZE, q_out)
        o_proj[0] = 0.0
        w[p + "self_attn.o_proj.weight"] = o_proj
        w[p + "post_attention_layernorm.weight"] = norm(channel0=0.0)
        w[p + "mlp.gate_proj.weight"] = layer(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        w[p + "mlp.up_proj.weight"] = layer(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        down_proj = layer(HIDDEN_SIZE, INTERMEDIATE_SIZE)
        down_proj[0] = 0.0
        w[p + "mlp.down_proj.weight"] = down_proj
    w["model.norm.weight"] = norm(channel0=CLASS_GAIN)
    return {name: (list(a.shape), a) for name, a in w.items()}  # tied embeddings: no lm_head.weight


def _safetensors_bytes(weights: dict[str, tuple[list[int], np.ndarray]]) -> bytes:
    """Serialise bf16 tensors in safetensors format: u64 header length, JSON header, raw data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(weights):
        shape, array = weights[name]
        data = _bf16_bytes(array)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _config(vocab_size: int, heads: tuple[int, int, int] = (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)) -> dict[str, object]:
    num_heads, num_kv_heads, head_dim = heads
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": NUM_LAYERS,
        "num_attention_heads": num_heads,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def _generation_config() -> dict[str, object]:
    return {
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
    }


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",  # built from tokenizer.json (fast / tokenizers backend)
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }


def _json_text(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_tiny_model(dest: Path, *, seed: int = 0, gpu: bool = False) -> Path:
    """Write the tiny Qwen2 chat model into ``dest`` (created if missing) and return ``dest``.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json, model.safetensors
    (about 0.75 MB in all). The same ``seed`` always gives byte-identical files.
    """
    from tokenizers import Tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer_text = _tokenizer_json()
    vocab_size = Tokenizer.from_str(tokenizer_text).get_vocab_size(with_added_tokens=True)
    heads = GPU_HEADS if gpu else (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    files = {
        "config.json": _json_text(_config(vocab_size, heads)).encode(),
        "generation_config.json": _json_text(_generation_config()).encode(),
        "tokenizer.json": tokenizer_text.encode(),
        "tokenizer_config.json": _json_text(_tokenizer_config()).encode(),
        "model.safetensors": _safetensors_bytes(_weights(_token_classes(tokenizer_text, vocab_size), seed, heads)),
    }
    for name, data in files.items():
        _write(dest / name, data)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m devkit.tiny_model DEST [--seed N]`: write the tiny model to DEST."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devkit.tiny_model", description=main.__doc__)
    parser.add_argument("dest", type=Path, help="directory to write the model into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--gpu", action="store_true", help="the GPU shape (head_dim 64 for FlashAttention 3)")
    args = parser.parse_args(argv)
    print(make_tiny_model(args.dest, seed=args.seed, gpu=args.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
