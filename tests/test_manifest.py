"""Manifest validation: every kind of problem is reported at once, with file:line, field and a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.errors import ManifestError
from packager.manifest import load_manifest, schema_json

ROOT = Path(__file__).resolve().parent.parent


def _load_bad(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    assert ei.value.path == str(p)
    return ei.value.problems


GOOD = """\
bundle: {name: demo, version: "1.0"}
target: {platform: linux-64, glibc: "2.28"}
models:
  - {name: tiny, source: huggingface, repo: org/tiny, revision: main}
services:
  - {name: tiny, model: tiny, port: 8000}
"""


def test_good_manifest_loads_with_defaults(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text(GOOD)
    m = load_manifest(p)
    assert m.bundle.name == "demo" and m.bundle.version == "1.0"
    assert m.models[0].repo == "org/tiny" and m.models[0].revision == "main"
    s = m.services[0]
    assert (s.host, s.port, s.tensor_parallel_size, s.serve_by) == ("127.0.0.1", 8000, 1, "path")
    assert m.environments == ()


@pytest.mark.parametrize("name", ["qwen3-32b", "deepseek-r1-1.5b", "glm-4-9b-chat", "qwen3-8b-existing-vllm"])
def test_shipped_manifests_are_valid(name: str) -> None:
    m = load_manifest(ROOT / "manifests" / f"{name}.yaml")
    assert m.services and m.models and m.environments


def test_shipped_manifests_match_the_deployments() -> None:
    q = load_manifest(ROOT / "manifests" / "qwen3-32b.yaml").services[0]
    assert (q.name, q.port, q.gpus, q.tensor_parallel_size, q.max_model_len) == ("qwen3-32b", 11434, (1, 2), 2, 18480)
    e = load_manifest(ROOT / "manifests" / "qwen3-8b-existing-vllm.yaml")
    assert [(x.name, x.existing) for x in e.environments] == [("installer-py", None), ("site-vllm", "/opt/vllm-venv")]
    d = load_manifest(ROOT / "manifests" / "deepseek-r1-1.5b.yaml")
    assert d.models[0].source == "modelscope"
    s = d.services[0]
    assert (s.served_model_name, s.max_model_len, s.dtype, s.gpu_memory_utilization) == (
        "DeepSeek-R1-1.5B", 2048, "half", 0.9)
    assert s.api_key_file and s.api_key_file.startswith("/")
    g = load_manifest(ROOT / "manifests" / "glm-4-9b-chat.yaml").services[0]
    assert g.trust_remote_code and g.max_model_len == 2048 and g.name == "glm-4-9b-chat"


def test_unknown_key_did_you_mean_with_line(tmp_path: Path) -> None:
    probs = _load_bad(tmp_path, GOOD.replace("revision: main", "revison: main"))
    assert any(":4:" in p and "models[0].revison" in p and "did you mean 'revision'" in p for p in probs), probs


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    text = """\
bundle: {name: demo}
target: {platform: linux64, glibc: 2.28}
models:
  - {name: tiny, source: hugginface, repo: a/b}
  - {name: tiny, source: local}
services:
  - {name: s1, model: tinny, port: 99999, gpus: [0], tensor_parallel_size: 2}
"""
    probs = _load_bad(tmp_path, text)
    joined = "\n".join(probs)
    for needle in ["bundle.version: required field is missing",
                   "target.platform: expected one of linux-64, linux-aarch64, found 'linux64'",
                   "(did you mean 'linux-64'?)",
                   'target.glibc: expected string, found a number 2.28 (write it in quotes: "2.28")',
                   "models[0].source", "did you mean 'huggingface'",
                   "models[1].name: duplicate name 'tiny'",
                   "source local needs 'path'",
                   "services[0].port: expected at most 65535, found 99999",
                   "no model named 'tinny' in this manifest (did you mean 'tiny'?)",
                   "1 GPU(s) listed but tensor_parallel_size × pipeline_parallel_size = 2"]:
        assert needle in joined, f"{needle!r} not in:\n{joined}"
    assert all(p.startswith(str(tmp_path / "m.yaml") + ":") for p in probs)
    lines = [int(p.split(":")[1]) for p in probs]
    assert lines == sorted(lines)


@pytest.mark.parametrize("text, needle", [
    ("bundle: [a, b]\n", "bundle: expected object, found a list"),
    ("bundle: {name: x, version: '1'\n", "not valid YAML"),
    ("", "the file is empty"),
    ("bundle: {name: x, version: '1'}\n", "at least one entry under environments or models"),
    ("bundle: {name: 'bad name', version: '1'}\nmodels: [{name: m, source: local, path: .}]\n", "bundle.name"),
    (GOOD + "  - {name: tiny2, model: tiny, port: 8000}\n", "port 8000 is already used by services[0]"),
    (GOOD.replace("port: 8000", "port: 8000, vllm_args: [--api-key, secret]"), "use api_key_file"),
    (GOOD.replace("port: 8000", "port: 8000, environment: nope"), "no environment named 'nope'"),
    (GOOD.replace("port: 8000", "port: '8000'"), "services[0].port: expected integer, found a string '8000'"),
    ("bundle: {name: x, version: '1'}\nenvironments: [{name: e, prefix: /nonexistent}]\n",
     "is not a conda environment"),
    ("bundle: {name: x, version: '1'}\nenvironments: [{name: e, cuda: '12.8'}]\n",
     "needs 'conda' specs"),
    ("bundle: {name: x, version: '1'}\nenvironments: [{name: e, cuda: '13.9', conda: [python]}]\n",
     "CUDA 13.9 is not in the driver table"),
    ("bundle: {name: x, version: '1'}\nmodels: [{name: m, source: local, path: nope}]\n", "is not a directory"),
    ("bundle: {name: x, version: '1', name: y}\nmodels: [{name: m, source: local, path: .}]\n", "duplicate key"),
])
def test_each_kind_of_error(tmp_path: Path, text: str, needle: str) -> None:
    probs = _load_bad(tmp_path, text)
    assert any(needle in p for p in probs), probs


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_published_schema_is_current_and_valid_json() -> None:
    shipped = (ROOT / "packager" / "schema" / "manifest.schema.json").read_text()
    assert shipped == schema_json(), "run: pack schema > packager/schema/manifest.schema.json"
    schema = json.loads(shipped)
    assert set(schema["properties"]) == {"bundle", "target", "environments", "models", "adapters", "services"}
    assert schema["properties"]["services"]["items"]["properties"]["port"]["maximum"] == 65535


def test_published_schema_accepts_shipped_manifests_with_jsonschema() -> None:
    import jsonschema
    import yaml

    schema = json.loads(schema_json())
    for f in sorted((ROOT / "manifests").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)


def test_the_enforced_schema_is_the_shipped_file() -> None:
    """One source: SCHEMA (packager/manifest/schema.py) is written out as the shipped file, and the validator
    `load_manifest` uses was built from that published text; a change to either without the other fails here."""
    from importlib import resources

    import jsonschema

    from packager.manifest import SCHEMA
    from packager.manifest.validate import validator

    shipped = json.loads(resources.files("packager").joinpath("schema/manifest.schema.json").read_text())
    assert shipped == SCHEMA == validator().schema
    jsonschema.Draft202012Validator.check_schema(shipped)
    # a rule added to the shipped file only is a drift, caught above; and the validator really enforces it:
    svc = SCHEMA["properties"]["services"]["items"]["properties"]
    assert svc["port"]["maximum"] == 65535
    assert not validator().is_valid({"bundle": {"name": "x", "version": "1"}, "services": [{"name": "s",
                                     "model": "m", "port": 65536}]})


def test_the_installer_never_imports_jsonschema() -> None:
    """jsonschema is a build-host dependency: nothing under installer/ (shipped to the server) imports it."""
    import ast

    for f in sorted((ROOT / "installer").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "jsonschema" for m in mods), f"{f} imports jsonschema"


def test_a_type_error_deep_in_a_list_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    text = """\
bundle: {name: demo, version: "1.0"}
models:
  - {name: tiny, source: huggingface, repo: org/tiny}
services:
  - name: tiny
    model: tiny
    tensor_parallel_size: 3
    gpus:
      - 0
      - one
      - 2
  - name: other
    model: tiny
    port: 8001
    env: {A: "x", B: [1, 2]}
"""
    probs = _load_bad(tmp_path, text)
    f = tmp_path / "m.yaml"
    assert probs == [f"{f}:10:9: services[0].gpus[1]: expected integer, found a string 'one'",
                     f"{f}:15:22: services[1].env.B: expected string or number or boolean, found a list"], probs


def test_an_integer_is_never_a_float_and_a_pattern_is_matched_whole(tmp_path: Path) -> None:
    """Two strictnesses of the target's loader that plain JSON Schema lacks (jsonschema takes 8000.0 as an
    integer and matches '^...$' with search, which lets a trailing newline through)."""
    text = GOOD.replace("port: 8000", "port: 8000.0")
    col = text.splitlines()[5].index("8000.0") + 1
    assert _load_bad(tmp_path, text) == [
        f"{tmp_path / 'm.yaml'}:6:{col}: services[0].port: expected integer, found a number 8000.0"]
    text = GOOD.replace('glibc: "2.28"', 'glibc: "2.28\\n"')
    col = text.splitlines()[1].index('"2.28') + 1
    probs = _load_bad(tmp_path, text)
    assert [p for p in probs if "target.glibc" in p] == [
        f"{tmp_path / 'm.yaml'}:2:{col}: target.glibc: '2.28\\n' contains a line break (at offset 4)"], probs
    from packager.manifest.validate import validator  # the schema alone refuses it too (fullmatch)

    doc = {"bundle": {"name": "x", "version": "1"}, "target": {"glibc": "2.28\n"}}
    assert [e.validator for e in validator().iter_errors(doc)] == ["pattern"]


def test_an_unknown_key_deep_down_gets_did_you_mean_at_the_key(tmp_path: Path) -> None:
    text = """\
bundle: {name: demo, version: "1.0"}
environments:
  - name: e
    python: "3.12"
    conda: [python]
    pip:
      packages: [vllm]
      index_ulr: https://download.pytorch.org/whl/cpu
"""
    probs = _load_bad(tmp_path, text)
    assert probs == [f"{tmp_path / 'm.yaml'}:8:7: environments[0].pip.index_ulr: unknown key 'index_ulr' "
                     "(did you mean 'index_url'?); allowed: packages, index_url, extra_index_urls, find_links, "
                     "no_index, remove"], probs


@pytest.mark.parametrize("text,needle", [
    ('bundle: {name: demo, version: "1.0"}\nmodels:\n  - name: tiny\n    source: huggingface\n'
     '    repo: !!python/object/apply:os.system ["touch PWNED"]\n',
     "m.yaml:5:11: models[0].repo: the YAML tag !!python/object/apply:os.system is not accepted"),
    ("bundle: !!python/object:os.system {name: x}\n", "m.yaml:1:9: bundle: the YAML tag !!python/object:os.system"),
    ("bundle: {name: demo, version: !!timestamp nope}\n", "m.yaml:1:31: bundle.version: the YAML tag !!timestamp"),
    ("bundle: {name: demo\n", "m.yaml:2:1: not valid YAML"),
    ("environments: &x [*x]\n", "m.yaml:1:15: environments[0]: expected object, found a list"),
    ("bundle: &a {name: x, version: '1'}\nmodels: [*a, *a, *a, *a]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '*a'] * 9)}]\n" for i in range(9)), "unknown key 'l0'"),
    ("[" * 5000, "not valid YAML: exceeded maximum nesting depth"),
])
def test_pack_validate_end_to_end_refuses_without_traceback(tmp_path: Path, text: str, needle: str) -> None:
    """The real `pack validate` on a real file: exit 2, file:line, no traceback, nothing executed."""
    import subprocess
    import sys

    p = tmp_path / "m.yaml"
    p.write_text(text)
    r = subprocess.run([sys.executable, "-m", "packager.cli", "validate", str(p)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.yaml"]  # nothing ran (no PWNED)


def test_pack_validate_warns_about_an_open_listener(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = tmp_path / "m.yaml"
    p.write_text(GOOD.replace("port: 8000}", "port: 8000, host: 0.0.0.0}"))
    r = subprocess.run([sys.executable, "-m", "packager.cli", "validate", str(p)], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.startswith(f"OK {p}")
    assert (f"warning: {p}: services[0].host: listens on 0.0.0.0 without api_key_file" in r.stderr), r.stderr
    assert load_manifest(p).warnings == ("services[0].host: listens on 0.0.0.0 without api_key_file: anyone who "
                                         "can reach this address can use the API; set api_key_file: or host: "
                                         "127.0.0.1",)


@pytest.mark.parametrize("services,needle", [
    ("[{name: a, model: tiny}, {name: b, model: tiny}]", "services[1]: port 8000 (the default) is already used by "
                                                         "services[0]"),
    ("[{name: a, model: tiny, host: 0.0.0.0, port: 9000}, {name: b, model: tiny, port: 9000}]",
     "services[1].port: port 9000 is already used by services[0]"),
    ("[{name: a, model: tiny, vllm_args: ['--api-key', 'sk']}]", "services[0].vllm_args[0]: --api-key in vllm_args"),
    ("[{name: a, model: tiny, env: {VLLM_API_KEY: sk}}]", "services[0].env.VLLM_API_KEY: VLLM_API_KEY must not be"),
    ("[{name: a, model: tiny, vllm_args: [\"a\\nb\"]}]", "services[0].vllm_args[0]: 'a\\nb' contains a line break"),
    ("[{name: a, model: tiny, env: {X: '%i'}}]", "services[0].env.X: value '%i' contains '%'"),
    ("[{name: a, model: tiny, api_key_file: /etc/../k}]", "services[0].api_key_file: '/etc/../k' must not contain"),
    ("[{name: \"a\\n\", model: tiny}]", "services[0].name: 'a\\n' contains a line break"),
])
def test_service_rules_at_validate_time(tmp_path: Path, services: str, needle: str) -> None:
    text = GOOD.replace("services:\n  - {name: tiny, model: tiny, port: 8000}\n", f"services: {services}\n")
    assert text != GOOD
    probs = _load_bad(tmp_path, text)
    assert any(needle in p for p in probs), probs
    assert all(p.startswith(f"{tmp_path / 'm.yaml'}:") for p in probs)
