"""R3, hostile MANIFEST fields: a newline, NUL, '%', ';', '$(...)' or '../' in any name, path or argument
field is refused, naming the field, by the target's loader (``Manifest.from_json``, through ``Bundle.load``
too) and by ``pack validate`` where the field exists in the YAML manifest.

Each case is built here from a table: a valid MANIFEST (as ``pack build`` writes it) with one field changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from installer.bundle import Bundle, canonical_json
from installer.bundle.manifest import Manifest, ManifestFieldError, field_path
from installer.errors import BundleError
from packager.errors import ManifestError
from packager.manifest import load_manifest
from tests.installer_fixtures import keys, models_only_bundle, run_installer, tree_snapshot  # noqa: F401

H = "a" * 64


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def valid_manifest() -> dict:
    """A MANIFEST.json document with every kind of field: a CUDA and a CPU environment, a hub and a local
    model, two services (one with an API key file, GPUs, env and vLLM arguments)."""
    files = [{"path": "config.json", "size": 100, "sha256": _sha("c")},
             {"path": "model.safetensors", "size": 1000, "sha256": _sha("w")},
             {"path": "tokenizer/vocab.txt", "size": 10, "sha256": _sha("v")}]
    env = {
        "name": "vllm-cu128", "artifact": "envs/vllm-cu128.tar.zst", "content_hash": H, "python": "3.12.11",
        "platform": "linux-64", "cuda": "12.8", "cuda_runtime": "12.8", "min_driver": "570.26",
        "driver_floor": "525.60.13", "glibc": "2.28", "archive_size": 1000, "unpacked_size": 5000, "files": 10,
        "vllm": {"version": "0.11.0", "distribution": "vllm",
                 "command": ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]},
        "needed_libraries": ["libnuma.so.1"],
        "needed_by": {"libnuma.so.1": ["lib/python3.12/site-packages/vllm/_C.abi3.so"]},
        "lock": {"conda": [{"name": "python", "version": "3.12.11", "build": "h1", "url": "https://x/p.conda",
                            "sha256": H}], "pip": [{"name": "vllm", "version": "0.11.0", "sha256": H}]},
    }
    cpu = {**copy.deepcopy(env), "name": "cpu", "artifact": "envs/cpu.tar.zst", "cuda": None,
           "cuda_runtime": None, "min_driver": None, "driver_floor": None, "content_hash": "b" * 64}
    models = [
        {"name": "qwen3-32b", "source": "huggingface", "repo": "Qwen/Qwen3-32B", "revision": "main",
         "commit": "1" * 40, "endpoint": "https://hf-mirror.example/hub", "dir": "models/qwen3-32b",
         "files": files, "size": 1110, "config": {"num_attention_heads": 64, "num_key_value_heads": 8}},
        {"name": "local", "source": "local", "repo": None, "revision": None, "commit": "2" * 64,
         "endpoint": None, "dir": "models/local", "files": files[:1], "size": 100, "config": {}},
    ]
    services = [
        {"name": "qwen3-32b", "model": "qwen3-32b", "environment": "vllm-cu128", "served_model_name": "Qwen/Qwen3",
         "host": "0.0.0.0", "port": 11434, "gpus": [1, 2], "tensor_parallel_size": 2, "pipeline_parallel_size": 1,
         "max_model_len": 18480, "dtype": "bfloat16", "gpu_memory_utilization": 0.9, "trust_remote_code": False,
         "api_key_file": "/etc/llm/keys/qwen.key", "serve_by": "path",
         "vllm_args": ["--enforce-eager", "--override-generation-config", '{"temperature": 0.5}'],
         "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "VLLM_LOGGING_LEVEL": "INFO"}},
        {"name": "small", "model": "local", "environment": "cpu", "served_model_name": "small", "host": "127.0.0.1",
         "port": 8000, "gpus": [], "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_model_len": None,
         "dtype": None, "gpu_memory_utilization": None, "trust_remote_code": False, "api_key_file": None,
         "serve_by": "repo_id", "vllm_args": [], "env": {}},
    ]
    artifacts = [{"path": "install.sh", "size": 10, "sha256": H, "kind": "bootstrap"},
                 {"path": "installer.tar.gz", "size": 10, "sha256": H, "kind": "installer"},
                 {"path": "runtime/vllm-cu128.tar.gz", "size": 10, "sha256": H, "kind": "runtime"},
                 {"path": "envs/vllm-cu128.tar.zst", "size": 1000, "sha256": H, "kind": "environment"},
                 {"path": "envs/cpu.tar.zst", "size": 1000, "sha256": H, "kind": "environment"}]
    for m in models:
        artifacts += [{"path": f"{m['dir']}/{f['path']}", "size": f["size"], "sha256": f["sha256"], "kind": "model"}
                      for f in m["files"]]
    return {
        "format_version": 1,
        "bundle": {"name": "qwen3-32b", "version": "2026.11.21", "description": "Qwen3 for the lab",
                   "tool": "llm-pack 0.1.0"},
        "target": {"platform": "linux-64", "arch": "x86_64", "glibc": "2.28"},
        "artifacts": sorted(artifacts, key=lambda a: a["path"]),
        "runtime": {"artifact": "runtime/vllm-cu128.tar.gz", "python": "bin/python3.12"},
        "installer": {"artifact": "installer.tar.gz"},
        "environments": [env, cpu],
        "models": models,
        "services": services,
    }


# Every name, path and argument field of MANIFEST.json (JSON path as a tuple).
NAME_PATH_ARG_FIELDS: list[tuple[str | int, ...]] = [
    ("bundle", "name"), ("bundle", "version"), ("bundle", "tool"),
    ("target", "glibc"),
    ("artifacts", 0, "path"),
    ("runtime", "artifact"), ("runtime", "python"), ("installer", "artifact"),
    ("environments", 0, "name"), ("environments", 0, "artifact"), ("environments", 0, "content_hash"),
    ("environments", 0, "python"), ("environments", 0, "cuda"), ("environments", 0, "cuda_runtime"),
    ("environments", 0, "min_driver"), ("environments", 0, "driver_floor"), ("environments", 0, "glibc"),
    ("environments", 0, "vllm", "version"), ("environments", 0, "vllm", "distribution"),
    ("environments", 0, "vllm", "command", 0), ("environments", 0, "vllm", "command", 2),
    ("environments", 0, "needed_libraries", 0),
    ("models", 0, "name"), ("models", 0, "repo"), ("models", 0, "revision"), ("models", 0, "commit"),
    ("models", 0, "endpoint"), ("models", 0, "dir"), ("models", 0, "files", 1, "path"),
    ("models", 0, "files", 1, "sha256"),
    ("services", 0, "name"), ("services", 0, "model"), ("services", 0, "environment"),
    ("services", 0, "served_model_name"), ("services", 0, "host"), ("services", 0, "api_key_file"),
    ("services", 0, "vllm_args", 0), ("services", 0, "vllm_args", 2),
    ("services", 0, "env", "VLLM_LOGGING_LEVEL"),
]

# (label, how the hostile value is made from the valid one)
HOSTILE = [
    ("newline", lambda v: v + "\n"),
    ("newline-inside", lambda v: v[:1] + "\nExecStartPre=+/bin/sh -c id\n" + v[1:]),
    ("NUL", lambda v: v + "\x00"),
    ("percent", lambda v: v + "%i"),
    ("semicolon", lambda v: v + ";id"),
    ("command-substitution", lambda v: v + "$(id)"),
    ("dot-dot", lambda v: "../" + v),
    ("dot-dot-inside", lambda v: v + "/../../etc"),
]


def _get(doc: dict, path: tuple):
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def test_valid_manifest_loads_and_round_trips() -> None:
    m = Manifest.from_json(canonical_json(valid_manifest()))
    assert m.services[0].host == "0.0.0.0" and m.services[0].env["VLLM_LOGGING_LEVEL"] == "INFO"
    assert m.environments[0].cuda == "12.8" and m.environments[1].is_cpu
    assert m.models[0].files[2].path == "tokenizer/vocab.txt"
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["services"] == valid_manifest()["services"]


def test_hostile_manifest_fields_are_refused_naming_the_field(tmp_path: Path) -> None:
    """Each (field, hostile value) → Manifest.from_json and Bundle.load refuse, naming the field; the bundle
    directory is unchanged."""
    tried = refused = 0
    misses = []
    root = tmp_path / "bundle"
    root.mkdir()
    for path in NAME_PATH_ARG_FIELDS:
        for label, make in HOSTILE:
            doc = valid_manifest()
            _set(doc, path, make(_get(doc, path)))
            data = canonical_json(doc)
            (root / "MANIFEST.json").write_bytes(data)
            before = tree_snapshot(tmp_path)
            tried += 1
            fields = []
            for load in (lambda d=data: Manifest.from_json(d), lambda: Bundle.load(root)):
                try:
                    load()
                except ManifestFieldError as e:
                    fields.append(e.field if field_path(path) in str(e) else f"{e.field} ({e})")
                else:
                    fields.append("accepted")
            if fields == [field_path(path)] * 2 and tree_snapshot(tmp_path) == before:
                refused += 1
            else:
                misses.append(f"{field_path(path)} {label}: {fields}")
    print(f"R3 hostile MANIFEST fields: {tried} cases tried, {refused} refused naming the field")
    assert not misses, "\n".join(misses)
    assert tried == refused == len(NAME_PATH_ARG_FIELDS) * len(HOSTILE)


@pytest.mark.parametrize("path,value,needle", [
    (("environments", 0, "cuda"), "12.8\n", "environments[0].cuda: '12.8\\n' contains a line break"),
    (("services", 0, "vllm_args", 2), "--api-key=sk-1", "services[0].vllm_args[2]: --api-key in vllm_args"),
    (("services", 1, "env"), {"VLLM_API_KEY": "sk"}, "services[1].env.VLLM_API_KEY: VLLM_API_KEY must not"),
    (("services", 1, "port"), 11434, "services[1].port: port 11434 on 127.0.0.1 is already used by services[0]"),
    (("services", 0, "port"), 0, "services[0].port: expected at least 1, found 0"),
    (("services", 0, "port"), True, "services[0].port: expected an integer, found a boolean"),
    (("services", 0, "gpus"), [1, 1], "services[0].gpus: a GPU index is listed twice"),
    (("services", 0, "extra"), 1, "services[0].extra: unknown field 'extra'"),
    (("models", 0, "commit"), "main", "models[0].commit: 'main' is not a valid commit"),
    (("environments", 1, "name"), "vllm-cu128", "environments[1].artifact: 'envs/cpu.tar.zst' is not"),
    (("models", 1, "dir"), "models/qwen3-32b", "models[1].dir: 'models/qwen3-32b' is not models/local"),
    (("runtime", "artifact"), "runtime/other.tar.gz", "runtime.artifact: 'runtime/other.tar.gz' is not listed"),
    (("format_version",), 2, "bundle format version 2 is not supported"),
])
def test_each_kind_of_refusal(path, value, needle) -> None:
    doc = valid_manifest()
    _set(doc, path, value)
    with pytest.raises(BundleError) as ei:
        Manifest.from_json(canonical_json(doc))
    assert needle in str(ei.value)
    assert "\nTraceback" not in str(ei.value)


@pytest.mark.parametrize("raw,needle", [
    (b'{"format_version": 1, "format_version": 1}', "duplicate key 'format_version'"),
    (b'{"format_version": NaN}', "NaN is not allowed"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[" * 100_000, "not valid JSON"),
    (b"[]", "expected a JSON object, found a list"),
])
def test_json_that_json_accepts_but_we_refuse(raw: bytes, needle: str) -> None:
    with pytest.raises(BundleError, match=None) as ei:
        Manifest.from_json(raw)
    assert needle in str(ei.value)


def test_bundle_load_refuses_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    doc = valid_manifest()
    doc["environments"][0]["cuda"] = "12.8\n"
    (root / "MANIFEST.json").write_bytes(canonical_json(doc))
    before = tree_snapshot(tmp_path)
    with pytest.raises(ManifestFieldError) as ei:
        Bundle.load(root)
    assert ei.value.field == "environments[0].cuda"
    assert str(ei.value).startswith(f"{root / 'MANIFEST.json'}: environments[0].cuda: ")
    assert tree_snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- the YAML side

def valid_yaml_doc() -> dict:
    return {
        "bundle": {"name": "demo", "version": "1.0", "description": "x"},
        "target": {"platform": "linux-64", "glibc": "2.28"},
        "environments": [{"name": "vllm", "python": "3.12", "cuda": "12.8", "conda": ["python=3.12"],
                          "pip": {"packages": ["vllm==0.11.0"]}}],
        "models": [{"name": "tiny", "source": "huggingface", "repo": "org/tiny", "revision": "main",
                    "endpoint": "https://hf-mirror.example"}],
        "services": [{"name": "tiny", "model": "tiny", "environment": "vllm", "served_model_name": "org/tiny",
                      "host": "127.0.0.1", "port": 8000, "api_key_file": "/etc/llm/keys/tiny.key",
                      "vllm_args": ["--enforce-eager", "--max-num-seqs=4"],
                      "env": {"VLLM_LOGGING_LEVEL": "INFO"}}],
    }


# The MANIFEST fields that come from the YAML (those that reach the target as names, paths, arguments).
YAML_FIELDS: list[tuple[str | int, ...]] = [
    ("bundle", "name"), ("bundle", "version"), ("target", "glibc"),
    ("environments", 0, "name"), ("environments", 0, "python"), ("environments", 0, "cuda"),
    ("models", 0, "name"), ("models", 0, "repo"), ("models", 0, "revision"), ("models", 0, "endpoint"),
    ("services", 0, "name"), ("services", 0, "model"), ("services", 0, "environment"),
    ("services", 0, "served_model_name"), ("services", 0, "host"), ("services", 0, "api_key_file"),
    ("services", 0, "vllm_args", 0), ("services", 0, "vllm_args", 1), ("services", 0, "env", "VLLM_LOGGING_LEVEL"),
]
# build-host inputs: a line break or NUL is refused; other characters are the solver's/pip's business
YAML_TEXT_FIELDS: list[tuple[str | int, ...]] = [
    ("bundle", "description"), ("environments", 0, "conda", 0), ("environments", 0, "pip", "packages", 0),
]


def _yaml_problems(tmp_path: Path, doc: dict) -> list[str]:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    before = tree_snapshot(tmp_path)
    try:
        load_manifest(p)
    except ManifestError as e:
        assert tree_snapshot(tmp_path) == before
        return e.problems
    return []


def test_valid_yaml_doc_loads(tmp_path: Path) -> None:
    assert _yaml_problems(tmp_path, valid_yaml_doc()) == []


def test_hostile_yaml_fields_are_refused_by_pack_validate(tmp_path: Path) -> None:
    tried = refused = 0
    misses = []
    cases = [(p, lab, mk) for p in YAML_FIELDS for lab, mk in HOSTILE]
    cases += [(p, lab, mk) for p in YAML_TEXT_FIELDS for lab, mk in HOSTILE if lab.startswith(("newline", "NUL"))]
    for path, label, make in cases:
        doc = valid_yaml_doc()
        _set(doc, path, make(_get(doc, path)))
        tried += 1
        problems = _yaml_problems(tmp_path, doc)
        want = f": {field_path(path)}: "
        hits = [p for p in problems if want in p]
        # file:line:col first, then the field
        if hits and hits[0].startswith(f"{tmp_path / 'm.yaml'}:") and hits[0].split(":")[1].isdigit():
            refused += 1
        else:
            misses.append(f"{field_path(path)} {label}: {problems or 'accepted'}")
    print(f"R3 hostile manifest.yaml fields (pack validate): {tried} cases tried, {refused} refused with "
          "file:line and the field")
    assert not misses, "\n".join(misses)
    assert refused == tried == len(YAML_FIELDS) * len(HOSTILE) + len(YAML_TEXT_FIELDS) * 3


def test_signed_bundle_with_a_hostile_field_installs_nothing(tmp_path: Path, keys) -> None:  # noqa: F811
    """A MANIFEST re-signed by the trusted key (the signature holds) with a unit-file injection in a vLLM
    argument: `python -m installer install` refuses naming the field, and the target is unchanged."""
    b = models_only_bundle(tmp_path / "out", keys)
    doc = json.loads((b / "MANIFEST.json").read_bytes())
    doc["services"][0]["vllm_args"] = ["--enforce-eager\nExecStartPre=+/bin/sh -c 'touch /tmp/pwned'"]
    data = canonical_json(doc)
    (b / "MANIFEST.json").write_bytes(data)
    (b / "MANIFEST.json.sig").write_bytes(keys.private.sign(data))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("server\n")
    before = tree_snapshot(root)
    r = run_installer("install", "--bundle", b, "--root", root, "--pubkey", keys.pub, check=False, timeout=120)
    print(f"signed hostile bundle: exit {r.returncode}: {r.stderr.strip()[:300]}")
    assert r.returncode != 0
    assert f"{b}/MANIFEST.json: services[0].vllm_args[0]: " in r.stderr and "contains a line break" in r.stderr
    assert "Traceback" not in r.stderr
    assert tree_snapshot(root) == before
