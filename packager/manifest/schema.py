"""The manifest's JSON Schema: the one source of what `pack validate` enforces and `pack schema` publishes.

``SCHEMA`` is the source; ``packager/schema/manifest.schema.json`` (the file editors use, shipped with the
package) is ``schema_json()`` written out: ``pack schema > packager/schema/manifest.schema.json`` after a
change here (tests/test_manifest.py fails while the two differ). ``packager.manifest.validate`` checks a
manifest against ``json.loads(schema_json())`` with jsonschema, so what is published is what is enforced.
The patterns come from the target's rules (installer/bundle/manifest.py) and are matched with fullmatch.
What JSON Schema cannot say (cross-field rules, names that must exist) is in ``packager.manifest.rules``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from installer.bundle import manifest as records


def _anchored(rx: re.Pattern) -> str:
    """A pattern of installer/bundle/manifest.py (the target's rules) for the JSON Schema (matched with fullmatch)."""
    return f"^{rx.pattern}$"


NAME_RE = _anchored(records.NAME_RE)
VERSION_RE = _anchored(records.VERSION_RE)
CUDA_RE = _anchored(records.CUDA_RE)
REVISION_RE = _anchored(records.REVISION_RE)


def _str(desc: str, **kw: Any) -> dict:
    return {"type": "string", "description": desc, **kw}


def _strlist(desc: str) -> dict:
    return {"type": "array", "items": {"type": "string"}, "description": desc}


def _obj(props: dict, required: tuple[str, ...] = (), desc: str = "") -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False,
            **({"description": desc} if desc else {})}


PIP_SCHEMA = _obj({
    "packages": _strlist("pip requirement specifiers, e.g. vllm==0.11.0"),
    "index_url": _str("pip --index-url (e.g. the PyTorch index for your CUDA)"),
    "extra_index_urls": _strlist("pip --extra-index-url values"),
    "find_links": _strlist("pip --find-links values (local wheel directories)"),
    "no_index": {"type": "boolean", "description": "pip --no-index: install only from find_links"},
    "remove": _strlist("distributions to uninstall after the pip layer"),
}, desc="the pip layer, installed with the environment's own pip")

ENV_SCHEMA = _obj({
    "name": _str("environment name (directory name on the target)", pattern=NAME_RE),
    "python": _str("Python version, e.g. '3.12'", pattern=r"^3\.[0-9]+(\.[0-9]+)?$"),
    "cuda": {"type": ["string", "null"], "pattern": CUDA_RE,
             "description": "CUDA version the environment is built for, e.g. '12.8'; null/omitted = CPU only"},
    "channels": _strlist("conda channels (names or URLs, file:// for a local channel)"),
    "conda": _strlist("conda match specs"),
    "pip": PIP_SCHEMA,
    "prefix": _str("pack this existing environment instead of building one"),
    "existing": _str("an environment the target server already has (absolute prefix holding bin/python with "
                     "vLLM): nothing is carried; the installer checks that it imports vLLM", pattern=r"^/.*$"),
    "download_kernels": {"type": "boolean", "description": "run `vllm download-kernels` at build time"},
    "compiler": {"type": "boolean", "description": "carry a C compiler (conda-forge gcc + a sysroot for "
                 "target.glibc; vLLM on CUDA compiles at every start); default: true when cuda is set"},
}, ("name",), "a conda environment (with vLLM) built for the target")

MODEL_SCHEMA = _obj({
    "name": _str("model name (directory name on the target)", pattern=NAME_RE),
    "source": {"type": "string", "enum": ["huggingface", "modelscope", "local"], "description": "where it comes from"},
    "repo": _str("hub repository id, org/name", pattern=_anchored(records.REPO_RE)),
    "revision": _str("branch, tag or commit (pinned to a commit at build time)", pattern=REVISION_RE),
    "path": _str("directory on the build host (source: local)"),
    "allow_patterns": _strlist("only files matching these glob patterns"),
    "ignore_patterns": _strlist("skip files matching these glob patterns"),
    "endpoint": _str("hub endpoint or mirror URL (default: HF_ENDPOINT / MODELSCOPE_ENDPOINT)",
                     pattern=_anchored(records.URL_RE)),
}, ("name", "source"), "a model snapshot")

ADAPTER_SCHEMA = _obj({
    **{k: v for k, v in MODEL_SCHEMA["properties"].items()},
    "name": _str("adapter name: clients ask for it as the model (`model: <name>`)", pattern=NAME_RE),
    "base": _str("the models[].name it adapts: served with every service of that model "
                 "(--enable-lora --lora-modules name=path, --max-lora-rank from adapter_config.json)"),
}, ("name", "source", "base"), "a LoRA adapter (peft: adapter_config.json + weights), pinned like a model")

SERVICE_SCHEMA = _obj({
    "name": _str("instance name: systemctl start llm@<name>", pattern=NAME_RE),
    "model": _str("a models[].name"),
    "environment": _str("an environments[].name"),
    "served_model_name": _str("name clients use in the API (default: name)"),
    "host": _str("address to listen on (default 127.0.0.1; another address needs api_key_file)"),
    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "TCP port"},
    "gpus": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "GPU indices"},
    "tensor_parallel_size": {"type": "integer", "minimum": 1, "description": "vLLM --tensor-parallel-size"},
    "pipeline_parallel_size": {"type": "integer", "minimum": 1, "description": "vLLM --pipeline-parallel-size"},
    "max_model_len": {"type": "integer", "minimum": 1, "description": "vLLM --max-model-len"},
    "dtype": {"type": "string", "enum": ["auto", "half", "float16", "bfloat16", "float", "float32"],
              "description": "vLLM --dtype"},
    "gpu_memory_utilization": {"type": "number", "minimum": 0.05, "maximum": 1.0,
                               "description": "vLLM --gpu-memory-utilization"},
    "trust_remote_code": {"type": "boolean", "description": "vLLM --trust-remote-code"},
    "api_key_file": _str("file on the target holding the API key (never put the key in the manifest)",
                         pattern=r"^/.*$"),
    "serve_by": {"type": "string", "enum": ["path", "repo_id"],
                 "description": "serve the model from its directory, or by repo id from an offline HF cache"},
    "vllm_args": _strlist("extra vLLM arguments"),
    "env": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]},
            "description": "extra environment variables for the service"},
    "task": {"type": "string", "enum": list(records.TASKS),
             "description": "what it serves: generate (chat/completions), embed (/v1/embeddings), score "
                            "(/v1/score, /rerank); spelled for the environment's vLLM (--runner pooling or --task)"},
    "convert": {"type": "string", "enum": ["embed", "classify"],
                "description": "adapt a generative model for task embed/score (vLLM --convert, vLLM >= 0.10.1)"},
    "max_lora_rank": {"type": "integer", "enum": list(records.LORA_RANKS),
                      "description": "vLLM --max-lora-rank (default: the smallest that holds the adapters' ranks)"},
    "nodes": {"type": "integer", "minimum": 1, "maximum": records.MAX_NODES,
              "description": "servers the service spans (> 1: a Ray cluster, llm-ray-head@/llm-ray-worker@ units, "
                             "tensor_parallel_size × pipeline_parallel_size workers spread evenly over them)"},
    "ray": _obj({"port": {"type": "integer", "minimum": 1024, "maximum": records.MAX_RAY_PORT,
                          "description": "the head's Ray GCS port (default 6379); Ray's other ports follow it"},
                 "wait_s": {"type": "integer", "minimum": 10, "maximum": 86400,
                            "description": "how long vLLM on the head waits for the nodes (default 900)"}},
                (), "the Ray cluster of a service with nodes > 1"),
    "node": {"description": "not in the manifest: each server's part (head or worker) is given at install time "
                           "with install.sh --overrides"},
}, ("name", "model"), "a vLLM instance run by systemd as llm@<name>")

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://llm-pack.invalid/manifest.schema.json",
    "title": "llm-pack bundle manifest",
    **_obj({
        "bundle": _obj({"name": _str("bundle name", pattern=NAME_RE),
                        "version": _str("bundle version, e.g. 2026.11.21", pattern=VERSION_RE),
                        "description": _str("free text")}, ("name", "version")),
        "target": _obj({"platform": {"type": "string", "enum": ["linux-64", "linux-aarch64"],
                                     "description": "conda platform of the target servers"},
                        "glibc": _str("oldest glibc on the target servers", pattern=_anchored(records.GLIBC_RE))}),
        "environments": {"type": "array", "items": ENV_SCHEMA},
        "models": {"type": "array", "items": MODEL_SCHEMA},
        "adapters": {"type": "array", "items": ADAPTER_SCHEMA},
        "services": {"type": "array", "items": SERVICE_SCHEMA},
    }, ("bundle",)),
}


def schema_json() -> str:
    """The published schema document (``pack schema``; the shipped file holds exactly this text)."""
    return json.dumps(SCHEMA, indent=2) + "\n"
