"""`llm-install bench` without vLLM: the built-in client against a small streaming server (real HTTP, SSE
like vLLM's), `vllm bench serve` result parsing, the table, the SVG, the CLI's errors and the saved JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from installer.bench import client, report
from installer.bench.run import BenchOptions, bench, last_error_line, parse_concurrency, write_plot
from installer.errors import InstallError, UsageError

ROOT = Path(__file__).resolve().parent.parent
STEP = 0.01  # seconds between streamed tokens


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({**doc, "auth": self.headers.get("Authorization")})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(2 * STEP)  # prefill
        for i in range(doc["max_tokens"]):
            text = "" if i == 1 else f"t{i}"  # a token that completes no character yet streams empty text
            chunk = {"choices": [{"index": 0, "text": text}], "usage": None}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(STEP)
        usage = {"choices": [], "usage": {"prompt_tokens": len(doc["prompt"]), "completion_tokens": doc["max_tokens"]}}
        self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_builtin_client_measures_streamed_requests(server) -> None:
    prompts = client.random_prompts(6, 20, 512, seed=1)
    assert prompts == client.random_prompts(6, 20, 512, seed=1) and all(len(p) == 20 for p in prompts)
    row = client.run_level("127.0.0.1", server, "tiny", prompts, 5, 3, api_key="k")
    assert row["completed"] == 6 and row["failed"] == 0 and row["concurrency"] == 3
    assert row["total_output_tokens"] == 30 and row["total_input_tokens"] == 120
    assert 2 * STEP * 1000 <= row["mean_ttft_ms"] < 1000
    assert STEP * 1000 * 0.5 <= row["mean_itl_ms"] < 500 and row["p99_itl_ms"] >= row["mean_itl_ms"] * 0.5
    assert row["mean_tpot_ms"] > 0 and row["request_throughput"] > 0 and row["output_throughput"] > 0
    sent = _Handler.seen[0]
    assert sent["ignore_eos"] is True and sent["stream"] is True and sent["max_tokens"] == 5
    assert sent["auth"] == "Bearer k" and len(sent["prompt"]) == 20


def test_a_request_that_fails_is_counted_not_raised() -> None:
    r = client.one_request("127.0.0.1", 9, "tiny", [1, 2], 4, timeout=2)  # discard port: refused
    assert not r.ok and r.error


VLLM_RESULT = {  # the fields `vllm bench serve --save-result` writes (vllm/benchmarks/serve.py, 0.32.0)
    "duration": 4.0, "completed": 16, "failed": 0, "total_input_tokens": 2048, "total_output_tokens": 1024,
    "request_throughput": 4.0, "output_throughput": 256.0, "total_token_throughput": 768.0,
    "mean_ttft_ms": 21.5, "median_ttft_ms": 20.0, "p99_ttft_ms": 40.25, "mean_tpot_ms": 3.5, "p99_tpot_ms": 6.0,
    "mean_itl_ms": 3.4, "p99_itl_ms": 9.0, "max_concurrency": 4, "num_prompts": 16, "backend": "openai-chat",
}


def test_vllm_result_parsed_and_tabled() -> None:
    row = report.from_vllm(VLLM_RESULT, 4)
    assert row["concurrency"] == 4 and row["duration_s"] == 4.0 and row["p99_ttft_ms"] == 40.25
    with pytest.raises(ValueError, match="no 'p99_itl_ms'"):
        report.from_vllm({k: v for k, v in VLLM_RESULT.items() if k != "p99_itl_ms"}, 4)
    with pytest.raises(ValueError, match="not a number"):
        report.from_vllm({**VLLM_RESULT, "mean_ttft_ms": "fast"}, 4)
    table = report.format_table([row, {**row, "concurrency": 16, "output_throughput": 1234.5}]).splitlines()
    assert table[0].split() == ["concurrency", "req/s", "output", "tok/s", "TTFT", "mean", "TTFT", "P99", "TPOT",
                                "mean", "TPOT", "P99", "ITL", "mean", "ITL", "P99", "ok/failed"]
    assert table[2].split() == ["4", "4.00", "256.0", "21.5", "40.2", "3.5", "6.0", "3.4", "9.0", "16/0"]
    assert table[3].split()[:3] == ["16", "4.00", "1234.5"]


def test_percentile_is_numpys_linear() -> None:
    assert report.percentile([], 99) == 0.0
    assert report.percentile([5.0], 99) == 5.0
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_svg_plot_is_valid_and_png_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    rows = [report.from_vllm({**VLLM_RESULT, "max_concurrency": c, "output_throughput": 100.0 * c}, c)
            for c in (1, 4, 16)]
    write_plot(tmp_path / "b.svg", rows, "llm@tiny <test>")
    svg = ET.parse(tmp_path / "b.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 3
    with pytest.raises(UsageError, match=r"give a \.svg file"):
        write_plot(tmp_path / "b.txt", rows, "t")
    # the installer's runtime has no matplotlib: run in a Python where it cannot be imported
    code = ("import sys; sys.modules['matplotlib'] = None; from pathlib import Path; "
            "from installer.bench.run import write_plot; from installer.errors import UsageError\n"
            "try:\n write_plot(Path(sys.argv[1]), [], 't')\nexcept UsageError as e:\n print(e)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.png")], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert "a PNG needs matplotlib" in r.stdout and "b.svg" in r.stdout


def test_options_and_last_error_line() -> None:
    assert parse_concurrency("1,4,16") == (1, 4, 16)
    for bad in ("", "0", "1,x", "-2"):
        with pytest.raises(UsageError, match="--concurrency"):
            parse_concurrency(bad)
    out = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
           "importlib.metadata.PackageNotFoundError: No package metadata was found for vllm\n")
    assert last_error_line(out) == "importlib.metadata.PackageNotFoundError: No package metadata was found for vllm"


def _instance(root: Path, name: str, port: int, model: Path, **extra: str) -> None:
    d = root / "etc" / "llm"
    d.mkdir(parents=True, exist_ok=True)
    lines = {"LLM_PYTHON": "/nonexistent/bin/python", "LLM_MODEL": str(model), "LLM_HOST": "127.0.0.1",
             "LLM_PORT": str(port), "LLM_SERVED_MODEL_NAME": name, **extra}
    (d / f"{name}.env").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))


def test_bench_falls_back_and_saves_json_next_to_the_state(tmp_path: Path, server) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    root = tmp_path / "root"
    _instance(root, "tiny", server, model)
    said: list[str] = []
    doc = bench(root, "tiny", BenchOptions(concurrency=(1, 2), input_len=8, output_len=3, num_prompts=4),
                say=said.append)
    assert doc["tool"].startswith("built-in client") and "does not work" in doc["note"]
    assert any("measuring with the built-in client instead" in s for s in said)
    assert [r["completed"] for r in doc["rows"]] == [4, 4]
    saved = root / doc["saved"].lstrip("/")
    assert saved.parent == root / "var/lib/llm/bench" and json.loads(saved.read_text())["rows"] == doc["rows"]
    assert all(max(p["prompt"]) < 300 for p in _Handler.seen)  # ids from the model's own vocabulary
    # the failure is remembered for this environment: the next run does not try `vllm bench serve` again
    said.clear()
    again = bench(root, "tiny", BenchOptions(concurrency=(1,), input_len=8, output_len=3, num_prompts=2),
                  say=said.append)
    assert "did not work" in again["note"] and not any(s.startswith("concurrency 1: vllm bench serve") for s in said)


def test_bench_refuses_what_it_cannot_measure(tmp_path: Path, server) -> None:
    root = tmp_path / "root"
    with pytest.raises(UsageError, match="no instance 'nope' is installed"):
        bench(root, "nope", BenchOptions())
    _instance(root, "emb", server, tmp_path, LLM_TASK="embed")
    with pytest.raises(UsageError, match="serves task 'embed'"):
        bench(root, "emb", BenchOptions())
    _instance(root, "down", 9, tmp_path)
    with pytest.raises(InstallError, match="is not serving on port 9"):
        bench(root, "down", BenchOptions())


def test_cli_bench_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "installer", "bench", "nope", "--root", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.startswith("error: no instance 'nope' is installed")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "installer", "bench", "x", "--root", str(tmp_path),
                        "--concurrency", "a"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "--concurrency 'a'" in r.stderr and "Traceback" not in r.stderr


def test_bench_runs_the_envs_vllm_bench_serve_when_it_works(tmp_path: Path, server) -> None:
    """A stand-in for a working ``vllm`` CLI (the GPU builds have one): it records its arguments and writes the
    result JSON where it is told to, as `vllm bench serve --save-result` does."""
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("#!/bin/sh\nexit 1\n")
    fake = bin_dir / "vllm"
    fake.write_text(f"""#!{sys.executable}
import json, sys
a = sys.argv[1:]
val = lambda k: a[a.index(k) + 1]
json.dump(a, open({str(tmp_path / "argv.json")!r}, "w"))
doc = {{**{json.dumps(VLLM_RESULT)}, "max_concurrency": int(val("--max-concurrency"))}}
json.dump(doc, open(val("--result-dir") + "/" + val("--result-filename"), "w"))
""")
    fake.chmod(0o755)
    (bin_dir / "python").chmod(0o755)
    root = tmp_path / "root"
    _instance(root, "gpu", server, tmp_path / "model-dir", LLM_PYTHON=str(bin_dir / "python"), HF_HUB_OFFLINE="1")
    doc = bench(root, "gpu", BenchOptions(concurrency=(2,), input_len=100, output_len=50), say=lambda s: None)
    assert doc["tool"] == "vllm bench serve" and doc["note"] == ""
    assert doc["rows"][0]["concurrency"] == 2 and doc["rows"][0]["p99_ttft_ms"] == 40.25
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["bench", "serve"]
    pairs = dict(zip(argv[2::1], argv[3::1]))
    assert pairs["--backend"] == "openai-chat" and pairs["--endpoint"] == "/v1/chat/completions"
    assert pairs["--dataset-name"] == "random" and pairs["--tokenizer"] == str(tmp_path / "model-dir")
    assert pairs["--base-url"] == f"http://127.0.0.1:{server}" and pairs["--model"] == "gpu"
    assert pairs["--random-input-len"] == "100" and pairs["--random-output-len"] == "50"
    assert pairs["--num-prompts"] == "8" and "--ignore-eos" in argv
