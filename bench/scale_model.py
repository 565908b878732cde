"""A synthetic model directory of a given size for bench/scale.py, written streaming in constant memory.

Layout as a Hugging Face snapshot: ``config.json``, ``generation_config.json``, tokenizer files,
``model.safetensors.index.json`` and ``model-0000i-of-0000N.safetensors`` shards of at most ``shard``
bytes. Each shard is a valid safetensors file (8-byte header length, JSON header, one U8 tensor) whose
data is an AES-256-CTR keystream: incompressible like real weights, ~3 GB/s on one core (os.urandom
gives ~0.3 GB/s here), deterministic per (seed, shard). Blocks of ``BLOCK`` bytes are written from one
reused buffer, so memory does not grow with the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 8 << 20
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "num_hidden_layers": 64,
    "vocab_size": 152064,
    "torch_dtype": "bfloat16",
}


def _header(tensor_bytes: int, name: str) -> bytes:
    meta = {"__metadata__": {"format": "pt"},
            name: {"dtype": "U8", "shape": [tensor_bytes], "data_offsets": [0, tensor_bytes]}}
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _shard_sizes(total: int, shard: int) -> list[int]:
    n = max(1, -(-total // shard))
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


class DiskLow(Exception):
    """The disk's free space fell below the floor while the model was written (the shard is removed)."""


def write_shard(path: Path, size: int, seed: bytes, tensor: str, floor: int = 0) -> None:
    """``size`` bytes in all: safetensors header + keystream, through one reused buffer; stops (DiskLow)
    before the free space beside it falls below ``floor`` bytes (checked every 512 MiB)."""
    head = _header(size, tensor)
    while len(head) + int(json.loads(head[8:])[tensor]["shape"][0]) != size:  # the header's length depends
        head = _header(size - len(head), tensor)                                # on the digits in it
    if len(head) >= size:
        raise ValueError(f"shard of {size} bytes is too small for its header")
    key = hashlib.sha256(seed).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(BLOCK)
    buf = bytearray(BLOCK + 15)  # update_into wants room for a block more
    view = memoryview(buf)
    left = size - len(head)
    with open(path, "wb") as f:
        f.write(head)
        k = 0
        while left:
            n = min(left, BLOCK)
            enc.update_into(zeros[:n] if n < BLOCK else zeros, buf)
            f.write(view[:n])
            left -= n
            k += 1
            if floor and k % 64 == 0 and (free := shutil.disk_usage(path.parent).free) < floor:
                f.close()
                path.unlink()
                raise DiskLow(f"{free / 1e9:.1f} GB free < floor {floor / 1e9:.1f} GB while writing {path.name}")


def make_model(d: Path, total: int, shard: int = 2_000_000_000, seed: str = "scale", floor: int = 0,
               sync: bool = True) -> list[Path]:
    """Write (or keep, when already complete at these sizes) a model of ``total`` bytes under ``d`` (see
    :func:`write_shard` for ``floor``).

    ``total`` counts the shards only (the small JSON files add a few KB). Returns every file written.
    """
    d.mkdir(parents=True, exist_ok=True)
    sizes = _shard_sizes(total, shard)
    n = len(sizes)
    shards = [d / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in d.glob("model-*.safetensors"):
        if stale not in shards:
            stale.unlink()
    for i, (p, size) in enumerate(zip(shards, sizes, strict=True)):
        if p.is_file() and p.stat().st_size == size:
            continue
        write_shard(p, size, f"{seed}/{total}/{i}".encode(), f"model.layers.{i}.weight", floor)
    small = {
        "config.json": CONFIG,
        "generation_config.json": {"do_sample": True, "temperature": 0.7, "top_p": 0.8},
        "tokenizer_config.json": {"model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer"},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}},
        "model.safetensors.index.json": {
            "metadata": {"total_size": total},
            "weight_map": {f"model.layers.{i}.weight": p.name for i, p in enumerate(shards)},
        },
    }
    files = list(shards)
    for name, obj in small.items():
        p = d / name
        p.write_text(json.dumps(obj, indent=1) + "\n")
        files.append(p)
    if sync:
        os.sync()
    return files
