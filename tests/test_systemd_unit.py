"""systemd integration, fast part: env files, the launcher, unit files under `systemd-analyze`, health.

The slow part (a real systemd in a network-less nspawn container) is tests/test_systemd_nspawn.py.
Where a server has to answer, it is API_DOUBLE_SOURCE below: a TEST DOUBLE of vLLM's OpenAI-compatible
HTTP API, started through the real launcher. It only exercises the unit and launcher mechanics; the real
vLLM is proven by the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer import service as systemd
from installer.errors import BundleError, InstallError, UsageError
from installer.service import health
from tests.installer_fixtures import service, tree_snapshot

# A TEST DOUBLE of vLLM's OpenAI-compatible API server (not vLLM!), used only to test unit mechanics.
API_DOUBLE_SOURCE = r'''
"""llm_api_double: TEST DOUBLE of vLLM's OpenAI-compatible HTTP API, for tests of unit mechanics only.

Takes vLLM api_server's options (--model, --host, --port, --served-model-name, --api-key; others ignored),
answers /health, /v1/models, /v1/chat/completions, and /debug/process (argv, environment, user, whether the
cache, /tmp and /dev/shm are writable). Like vLLM it runs an "engine" child process and exits with status 0
when that child dies. LLM_DOUBLE_FAIL_COMPLETIONS=1 makes completions answer 500 while /health says 200.
"""
import argparse
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def probe_writable(dirs):
    out = {}
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "probe-%d" % os.getpid())
            with open(path, "w") as f:
                f.write("x")
            os.unlink(path)
            out[d] = True
        except OSError as e:
            out[d] = str(e)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name")
    p.add_argument("--api-key")
    args, rest = p.parse_known_args()
    name = args.served_model_name or args.model
    key = args.api_key or os.environ.get("VLLM_API_KEY")
    dirs = [d for d in (os.environ.get("VLLM_CACHE_ROOT"), "/tmp", "/dev/shm") if d]
    writable = probe_writable(dirs)
    engine = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    fail = os.environ.get("LLM_DOUBLE_FAIL_COMPLETIONS") == "1"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            sys.stderr.write("api-double: " + (fmt % a) + "\n")

        def reply(self, status, doc):
            raw = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def authorized(self):
            if key and self.headers.get("Authorization") != "Bearer " + key:
                self.reply(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {})
            elif self.path == "/v1/models":
                if self.authorized():
                    self.reply(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            elif self.path == "/debug/process":
                self.reply(200, {"argv": sys.argv, "env": dict(os.environ), "uid": os.getuid(),
                                 "user": pwd.getpwuid(os.getuid()).pw_name, "cwd": os.getcwd(),
                                 "pid": os.getpid(), "engine_pid": engine.pid, "writable": writable,
                                 "unknown_args": rest})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self.reply(404, {"error": "not found"})
            if not self.authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if body.get("model") != name:
                return self.reply(404, {"error": "The model %s does not exist." % body.get("model")})
            if fail:
                return self.reply(500, {"error": "EngineCore failed (test double)"})
            self.reply(200, {"id": "chatcmpl-double", "object": "chat.completion", "model": name,
                             "choices": [{"index": 0, "finish_reason": "length",
                                          "message": {"role": "assistant",
                                                      "content": "hello from the double"}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})

    server = ThreadingHTTPServer((args.host, args.port), Handler)

    def engine_watch():
        engine.wait()
        sys.stderr.write("api-double: engine process died; exiting with status 0 like vLLM\n")
        sys.stderr.flush()
        os._exit(0)

    def on_term(signum, frame):
        engine.terminate()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=engine_watch, daemon=True).start()
    sys.stderr.write("api-double: serving %s on %s:%d (pid %d, engine %d)\n"
                     % (name, args.host, args.port, os.getpid(), engine.pid))
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
'''

GPU_ENV = {
    "name": "vllm-cu128",
    "artifact": "envs/vllm-cu128.tar.zst",
    "content_hash": "1" * 64,
    "cuda": "12.8",
    "python": "3.12.11",
    "vllm": {"version": "0.11.0", "command": ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]},
}
CPU_ENV = {
    "name": "vllm-cpu",
    "artifact": "envs/vllm-cpu.tar.zst",
    "content_hash": "2" * 64,
    "cuda": None,
    "python": "3.11.7",
    "vllm": {"version": "0.32.0", "command": ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]},
}


def gpu_service(**kw) -> dict:
    return service(**{"name": "qwen3-32b", "model": "qwen3-32b", "environment": "vllm-cu128", "port": 11434,
                      "host": "0.0.0.0", "gpus": [1, 2], "tensor_parallel_size": 2, "max_model_len": 18480,
                      "dtype": None, "gpu_memory_utilization": 0.9, "vllm_args": [], **kw})


def cpu_service(**kw) -> dict:
    return service(**{"name": "tiny", "environment": "vllm-cpu", "port": 8000, "served_model_name": "tiny-chat",
                      **kw})


def render(svc: dict, env_meta: dict, **kw) -> dict[str, str]:
    text = systemd.render_env_file(
        svc,
        env_meta,
        env_prefix=Path("/opt/llm/envs/e/0123456789abcdef"),
        model_path=kw.pop("model_path", "/opt/llm/models/m/abc"),
        hf_cache=kw.pop("hf_cache", None),
        **kw,
    )
    return systemd.parse_env_file(text)


# --------------------------------------------------------------------------- env files


def test_gpu_env_file():
    env = render(gpu_service(), GPU_ENV, bundle={"name": "qwen3-32b", "version": "2026.11.21"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "VLLM_NO_USAGE_STATS",
        "DO_NOT_TRACK",
        "HF_HUB_DISABLE_TELEMETRY",
    ):
        assert env[key] == "1", key
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert env["LLM_PYTHON"] == "/opt/llm/envs/e/0123456789abcdef/bin/python"
    assert env["LLM_ENTRYPOINT"] == "vllm.entrypoints.openai.api_server"
    assert env["PATH"].startswith("/opt/llm/envs/e/0123456789abcdef/bin:")
    assert env["VLLM_CACHE_ROOT"] == "/var/cache/llm/qwen3-32b/vllm"
    assert env["HOME"] == "/var/cache/llm/qwen3-32b"
    assert env["LLM_MODEL"] == "/opt/llm/models/m/abc"
    assert env["LLM_HOST"] == "0.0.0.0" and env["LLM_PORT"] == "11434"
    assert env["LLM_SERVED_MODEL_NAME"] == "qwen3-32b"
    assert env["LLM_MAX_MODEL_LEN"] == "18480"
    assert env["LLM_TENSOR_PARALLEL_SIZE"] == "2" and env["LLM_PIPELINE_PARALLEL_SIZE"] == "1"
    assert env["LLM_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert "LLM_DTYPE" not in env and "LLM_TRUST_REMOTE_CODE" not in env and "LLM_API_KEY_FILE" not in env
    assert "HF_HUB_CACHE" not in env
    assert env["LLM_BUNDLE_VERSION"] == "2026.11.21"


def test_cpu_env_file_and_service_env_wins():
    env = render(cpu_service(), CPU_ENV)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert env["LLM_DTYPE"] == "bfloat16" and env["LLM_ARG_1"] == "--enforce-eager"
    env = render(
        cpu_service(env={"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_HOST_IP": "10.0.0.5", "OMP_NUM_THREADS": 2}),
        CPU_ENV,
    )
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["VLLM_HOST_IP"] == "10.0.0.5"
    assert env["OMP_NUM_THREADS"] == "2"


def test_trust_remote_code_and_repo_id():
    env = render(
        gpu_service(trust_remote_code=True, serve_by="repo_id", gpus=[0]),
        GPU_ENV,
        model_path="THUDM/glm-4-9b-chat",
        hf_cache=Path("/opt/llm/models/hf-cache"),
    )
    assert env["LLM_TRUST_REMOTE_CODE"] == "1"
    assert env["LLM_MODEL"] == "THUDM/glm-4-9b-chat"
    assert env["HF_HUB_CACHE"] == "/opt/llm/models/hf-cache"
    assert env["HF_HOME"] == "/var/cache/llm/qwen3-32b/huggingface"  # writable: remote code lands here
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_api_key_only_as_file_path():
    text = systemd.render_env_file(
        gpu_service(api_key_file="/etc/llm/keys/qwen.key"),
        GPU_ENV,
        env_prefix=Path("/e"),
        model_path="/m",
        hf_cache=None,
    )
    assert "LLM_API_KEY_FILE=/etc/llm/keys/qwen.key" in text
    assert "VLLM_API_KEY" not in text and "--api-key" not in text
    with pytest.raises(UsageError, match="VLLM_API_KEY"):
        render(gpu_service(env={"VLLM_API_KEY": "sk-secret"}), GPU_ENV)
    for args in (["--api-key", "sk-secret"], ["--api-key=sk-secret"]):
        with pytest.raises(UsageError, match="command line"):
            render(gpu_service(vllm_args=args), GPU_ENV)
    with pytest.raises(UsageError, match="absolute"):
        render(gpu_service(api_key_file="keys/qwen.key"), GPU_ENV)


def test_values_are_quoted_for_systemd_and_read_back():
    tricky = ['{"temperature": 0.5}', "a b", 'x"y', "back\\slash", "it's", ""]
    svc = cpu_service(vllm_args=["--override-generation-config", *tricky])
    text = systemd.render_env_file(svc, CPU_ENV, env_prefix=Path("/e"), model_path="/m", hf_cache=None)
    env = systemd.parse_env_file(text)
    assert [env[f"LLM_ARG_{i}"] for i in range(2, 2 + len(tricky))] == tricky
    assert 'LLM_ARG_4="x\\"y"' in text and 'LLM_ARG_5="back\\\\slash"' in text


@pytest.mark.parametrize("arg,needle", [
    ("a\nb", "contains a line break"),
    ("a\rb", "contains a carriage return"),
    ("a\x00b", "contains a NUL byte"),
    ("%i", "contains '%'"),
    ("$HOME", "contains '$'"),
    ("`id`", "contains '`'"),
    ("a;b", "contains ';'"),
    ("--chat-template=../../etc/x", "climbs with '..'"),
])
def test_unsafe_argument_values_are_refused(arg, needle):
    for svc in (cpu_service(vllm_args=["--enforce-eager", arg]), cpu_service(env={"X": arg})):
        with pytest.raises(UsageError) as ei:
            render(svc, CPU_ENV)
        assert needle in str(ei.value)
        assert ("vllm_args[1]" if svc["vllm_args"] != ["--enforce-eager"] else "env.X") in str(ei.value)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x@y", "a" * 65, "../etc"])
def test_bad_instance_names(name):
    with pytest.raises(UsageError):
        systemd.unit_name(name)


def test_devices_dropins():
    cpu = systemd.render_devices_dropin(CPU_ENV)
    assert "PrivateDevices=yes" in cpu and "DeviceAllow" not in cpu
    gpu = systemd.render_devices_dropin(GPU_ENV, nvidia_modprobe="/usr/bin/nvidia-modprobe")
    assert "PrivateDevices=no" in gpu and "DevicePolicy=closed" in gpu
    for group in ("nvidia", "nvidiactl", "nvidia-uvm", "nvidia-caps", "nvidia-frontend"):
        assert f"DeviceAllow=char-{group} rw" in gpu
    assert "ExecStartPre=-+/usr/bin/nvidia-modprobe -u -c=0" in gpu
    assert "ExecStartPre" not in systemd.render_devices_dropin(GPU_ENV)


# --------------------------------------------------------------------------- the launcher, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def double_dir(tmp_path: Path) -> Path:
    d = tmp_path / "double"
    d.mkdir()
    (d / "llm_api_double.py").write_text(API_DOUBLE_SOURCE)
    return d


def launch(env_text: str, double_dir: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """Start the real launcher with the variables of an env file, as systemd would."""
    env = systemd.parse_env_file(env_text)
    env["PYTHONPATH"] = str(double_dir)
    env.update(extra_env or {})
    return subprocess.Popen(
        ["bash", str(systemd.UNITS_SRC / "llm-serve")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def double_service(tmp_path: Path, port: int, **kw) -> str:
    svc = cpu_service(port=port, vllm_args=["--enforce-eager", '{"a": "b c"}'], **kw)
    meta = dict(CPU_ENV, vllm={"command": ["bin/python", "-m", "llm_api_double"]})
    text = systemd.render_env_file(
        svc, meta, env_prefix=Path(sys.executable).parent.parent, model_path=str(tmp_path), hf_cache=None
    )
    py = Path(sys.executable)
    return text.replace(f"LLM_PYTHON={py.parent.parent}/bin/python", f"LLM_PYTHON={py}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_launcher_serves_with_api_key_from_file(tmp_path, double_dir):
    key_file = tmp_path / "api.key"
    key_file.write_text("sk-test-123\n")
    key_file.chmod(0o640)
    port = free_port()
    text = double_service(tmp_path, port, api_key_file=str(key_file))
    proc = launch(text, double_dir, {"VLLM_CACHE_ROOT": str(tmp_path / "cache")})
    try:
        seconds = health.wait_healthy(
            "127.0.0.1", port, timeout=30, interval=0.1, alive=lambda: proc.poll() is None
        )
        assert seconds < 30
        info = json.loads(health.request("127.0.0.1", port, "GET", "/debug/process")[1])
        # exec: the launcher's PID is the server's PID (so it is the unit's MainPID)
        assert info["pid"] == proc.pid
        assert info["env"]["VLLM_API_KEY"] == "sk-test-123"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"sk-test-123" not in cmdline
        assert info["argv"][1:] == [
            "--model",
            str(tmp_path),
            "--served-model-name",
            "tiny-chat",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--tensor-parallel-size",
            "1",
            "--pipeline-parallel-size",
            "1",
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            '{"a": "b c"}',
        ]
        assert health.list_models("127.0.0.1", port, "sk-test-123") == ["tiny-chat"]
        result = health.probe_completion("127.0.0.1", port, "tiny-chat", "sk-test-123")
        assert result["status"] == 200 and result["content"] == "hello from the double"
        assert health.read_api_key(Path("/"), str(key_file)) == "sk-test-123"
        with pytest.raises(InstallError, match="HTTP 401"):
            health.probe_completion("127.0.0.1", port, "tiny-chat", "wrong-key")
        with pytest.raises(InstallError, match="HTTP 404"):
            health.probe_completion("127.0.0.1", port, "no-such-model", "sk-test-123")
    finally:
        stop(proc)


def test_completion_check_catches_what_health_misses(tmp_path, double_dir):
    port = free_port()
    proc = launch(double_service(tmp_path, port), double_dir, {"LLM_DOUBLE_FAIL_COMPLETIONS": "1"})
    try:
        health.wait_healthy("127.0.0.1", port, timeout=30, interval=0.1)
        with pytest.raises(InstallError, match="HTTP 500"):
            health.probe_completion("0.0.0.0", port, "tiny-chat")
    finally:
        stop(proc)


def test_wait_healthy_gives_up():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(InstallError, match="not healthy after 1 s"):
        health.wait_healthy("127.0.0.1", port, timeout=1, interval=0.2)
    with pytest.raises(InstallError, match="stopped before it became healthy") as e:
        health.wait_healthy("127.0.0.1", port, timeout=60, alive=lambda: False, unit="llm@x.service")
    assert "journalctl -u llm@x.service" in str(e.value)
    assert time.monotonic() - t0 < 10


def test_a_unit_that_exits_78_is_reported_with_the_launchers_reason(tmp_path):
    """The real cause, not "ConnectionRefusedError": the launcher's exit-78 line from the journal."""
    journal = ["llm-serve: cannot read the API key file /etc/llm/keys/k as user llm; make it owned by root:llm"]
    cause = health.explain_exit(78, "exit-code", journal)
    assert cause == ("exited with status 78 (configuration error, not restarted): llm-serve: cannot read the API "
                     "key file /etc/llm/keys/k as user llm; make it owned by root:llm")
    port = free_port()
    with pytest.raises(InstallError) as e:
        health.wait_healthy("127.0.0.1", port, timeout=60, alive=lambda: False, unit="llm@x.service",
                            why=lambda: cause)
    assert str(e.value).startswith(f"llm@x.service stopped before it became healthy: {cause}")
    assert "ConnectionRefusedError" not in str(e.value)
    assert "exit status 243" in health.explain_exit(243, "exit-code", [], key_file="/etc/llm/keys/k")
    assert health.explain_exit(1, "exit-code", ["boom"]) == "exited with status 1 (exit-code); last log line: boom"
    assert health.explain_exit(None, None, []) is None
    # the same text the real launcher prints when it exits 78
    env = {"PATH": os.environ["PATH"], "LLM_PYTHON": sys.executable, "LLM_MODEL": "/m",
           "LLM_API_KEY_FILE": str(tmp_path / "missing.key")}
    r = subprocess.run(["bash", str(systemd.UNITS_SRC / "llm-serve")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 78
    assert "cannot read the API key file" in health.explain_exit(r.returncode, "exit-code", r.stderr.splitlines())


def test_missing_key_file_at_start_is_a_clear_error(tmp_path):
    with pytest.raises(InstallError) as e:
        health.read_api_key(tmp_path, "/etc/llm/keys/none.key")
    assert str(e.value).startswith("cannot read the API key file /etc/llm/keys/none.key: No such file")


@pytest.mark.parametrize("case", ["no-python", "bad-python", "no-model", "unreadable-key", "empty-key", "cc-missing",
                                  "no-cc-on-path"])
def test_launcher_config_errors_exit_78(tmp_path, case):
    env = {"PATH": os.environ["PATH"], "LLM_PYTHON": sys.executable, "LLM_MODEL": "/m"}
    key = tmp_path / "k"
    if case == "cc-missing":
        env |= {"LLM_NEEDS_CC": "1", "CC": "/usr/bin/no-such-cc"}
    elif case == "no-cc-on-path":
        bindir = tmp_path / "bin"  # a PATH with bash and the commands the launcher uses, and no compiler
        bindir.mkdir()
        for tool in ("bash", "id"):
            os.symlink(shutil.which(tool), bindir / tool)
        env |= {"LLM_NEEDS_CC": "1", "PATH": str(bindir)}
    elif case == "no-python":
        del env["LLM_PYTHON"]
    elif case == "bad-python":
        env["LLM_PYTHON"] = str(tmp_path / "nope")
    elif case == "no-model":
        del env["LLM_MODEL"]
    elif case == "unreadable-key":
        env["LLM_API_KEY_FILE"] = str(tmp_path / "missing.key")
    else:
        key.write_text("\n")
        env["LLM_API_KEY_FILE"] = str(key)
    r = subprocess.run(
        ["bash", str(systemd.UNITS_SRC / "llm-serve")], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith("llm-serve: ")
    if case.startswith(("cc", "no-cc")):
        assert len(r.stderr.strip().splitlines()) == 1 and "install gcc" in r.stderr and "GPU" in r.stderr


def test_launcher_starts_a_gpu_instance_when_its_compiler_is_there(tmp_path):
    env = {"PATH": os.environ["PATH"], "LLM_PYTHON": sys.executable, "LLM_MODEL": "/m", "LLM_NEEDS_CC": "1",
           "CC": shutil.which("cc") or "/usr/bin/cc", "LLM_ENTRYPOINT": "platform"}  # `python -m platform`
    r = subprocess.run(["bash", str(systemd.UNITS_SRC / "llm-serve")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert "llm-serve: exec" in r.stderr and r.returncode != 78, r.stderr


# --------------------------------------------------------------------------- unit files on disk


def manifest() -> dict:
    return {
        "bundle": {"name": "demo", "version": "1.0"},
        "environments": [GPU_ENV, CPU_ENV],
        "services": [gpu_service(api_key_file="/etc/llm/keys/qwen.key"), cpu_service()],
    }


def resolve(svc: dict) -> systemd.InstancePaths:
    env = "0123456789abcdef"
    return systemd.InstancePaths(
        Path(f"/opt/llm/envs/{svc['environment']}/{env}"), f"/opt/llm/models/{svc['model']}/abc"
    )


def staging_root(tmp_path: Path) -> Path:
    """A staging tree with the host's systemd units, so `systemd-analyze --root` can load ours."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


def test_install_units_layout(tmp_path, caplog):
    root = tmp_path / "root"
    written = systemd.install_units(root, manifest(), resolve)
    rel = sorted(str(p.relative_to(root)) for p in written)
    assert rel == [
        "etc/llm/qwen3-32b.env",
        "etc/llm/tiny.env",
        "etc/systemd/system/llm@.service",
        "etc/systemd/system/llm@qwen3-32b.service.d/devices.conf",
        "etc/systemd/system/llm@tiny.service.d/devices.conf",
        "opt/llm/bin/llm-serve",
    ]
    assert stat.S_IMODE((root / "opt/llm/bin/llm-serve").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc/llm/tiny.env").stat().st_mode) == 0o644
    assert (root / "etc/systemd/system/llm@.service").read_text() == systemd.template_text()
    assert "PrivateDevices=yes" in (root / "etc/systemd/system/llm@tiny.service.d/devices.conf").read_text()
    assert "char-nvidia-uvm" in (root / "etc/systemd/system/llm@qwen3-32b.service.d/devices.conf").read_text()
    assert "API key file /etc/llm/keys/qwen.key does not exist" in caplog.text
    assert not list(root.rglob(".*.env.*")), "temp files left behind"
    # idempotent: same bytes the second time
    before = {p: p.read_bytes() for p in written}
    systemd.install_units(root, manifest(), resolve)
    assert {p: p.read_bytes() for p in written} == before
    # the instance's CacheDirectory (created by systemd when it ran, filled by vLLM) goes with it
    cache = root / "var/cache/llm/tiny/vllm/modelinfos"
    cache.mkdir(parents=True)
    (cache / "x.json").write_text("{}")
    # uninstall leaves nothing of ours
    removed = systemd.remove_units(root, ["qwen3-32b", "tiny"])
    assert sorted(removed) == sorted(written + [root / "var/cache/llm/tiny"])
    assert not (root / "var/cache/llm").exists()
    assert not (root / "etc/llm").exists() and not (root / "opt/llm/bin").exists()
    assert not list((root / "etc/systemd/system").iterdir())


def test_model_only_bundle_uses_installed_env_meta(tmp_path):
    m = {"bundle": {"name": "m", "version": "2"}, "environments": [], "services": [cpu_service()]}
    with pytest.raises(InstallError, match="neither in this bundle nor installed"):
        systemd.install_units(tmp_path, m, resolve)
    systemd.install_units(tmp_path, m, lambda s: (Path("/opt/llm/envs/vllm-cpu/x"), "/m", None, CPU_ENV))
    assert "VLLM_CPU_KVCACHE_SPACE=1" in (tmp_path / "etc/llm/tiny.env").read_text()


def analyze(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("instance", ["qwen3-32b", "tiny"])
def test_systemd_analyze_verify_and_security(tmp_path, instance):
    root = staging_root(tmp_path)
    (root / "usr/bin").mkdir(parents=True)
    modprobe = root / "usr/bin/nvidia-modprobe"
    modprobe.write_text("#!/bin/sh\nexit 0\n")
    modprobe.chmod(0o755)
    systemd.install_units(root, manifest(), resolve)
    assert (
        "nvidia-modprobe" in (root / f"etc/systemd/system/llm@{instance}.service.d/devices.conf").read_text()
        or instance == "tiny"
    )
    unit = f"llm@{instance}.service"
    r = analyze("verify", f"--root={root}", unit)
    print(f"systemd-analyze verify {unit}: exit {r.returncode} {r.stdout}{r.stderr}")
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == ""
    r = analyze("security", "--offline=yes", f"--root={root}", "--no-pager", unit)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security {unit}: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 2.0, r.stdout
    # a broken ExecStart target is caught by verify (so the check above can fail)
    (root / "opt/llm/bin/llm-serve").unlink()
    r = analyze("verify", f"--root={root}", unit)
    assert r.returncode != 0 and "llm-serve" in r.stderr


def test_unit_text_reads_like_documentation():
    text = systemd.template_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert "Documentation=https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html" in lines
    assert "Wants=network-online.target" in lines and "After=network-online.target" in lines
    for opt in (
        "User=llm",
        "Group=llm",
        "EnvironmentFile=/etc/llm/%i.env",
        "ExecStart=/opt/llm/bin/llm-serve",
        "Restart=always",
        "RestartSec=5",
        "CacheDirectory=llm/%i",
        "LimitNOFILE=65536",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "KillMode=control-group",
        "TimeoutStopSec=30",
    ):
        assert opt in lines, opt
    assert not any(ln.startswith("MemoryDenyWriteExecute") for ln in lines)
    # one option per line
    assert all(re.match(r"^(\[\w+\]|[A-Za-z]+=.*)$", ln) for ln in lines)


# --------------------------------------------------------------------------- user, key file, systemctl


def test_ensure_user_in_staging_tree(tmp_path):
    if shutil.which("systemd-sysusers") is None and shutil.which("useradd") is None:
        pytest.fail("neither systemd-sysusers nor useradd is installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/nologin").write_text("")
    for f in ("passwd", "group"):
        (root / "etc" / f).write_text("root:x:0:0:root:/root:/bin/bash\n" if f == "passwd" else "root:x:0:\n")
    for f in ("shadow", "gshadow"):
        (root / "etc" / f).write_text("root:*::::::::\n" if f == "shadow" else "root:*::\n")
    assert systemd.ensure_user(root) is True
    entry = [ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("llm:")]
    assert entry, (root / "etc/passwd").read_text()
    fields = entry[0].split(":")
    assert 0 < int(fields[2]) < 1000 and fields[6] == "/usr/sbin/nologin"
    assert any(ln.startswith("llm:") for ln in (root / "etc/group").read_text().splitlines())
    assert "u llm -" in (root / "etc/sysusers.d/llm.conf").read_text()
    assert systemd.ensure_user(root) is False  # already there
    # an API key file readable by llm through its group passes; others are flagged
    key = root / "etc/llm/keys/k"
    key.parent.mkdir(parents=True)
    key.write_text("sk\n")
    gid = int(fields[3])
    os.chown(key, 0, gid)
    key.chmod(0o640)
    assert systemd.check_api_key_file(root, "/etc/llm/keys/k") == []
    key.chmod(0o644)
    assert "readable by every user" in systemd.check_api_key_file(root, "/etc/llm/keys/k")[0]
    os.chown(key, 0, 0)
    key.chmod(0o600)
    assert "not readable by user llm" in systemd.check_api_key_file(root, "/etc/llm/keys/k")[0]
    key.chmod(0o660)
    assert any("writable by its group" in p for p in systemd.check_api_key_file(root, "/etc/llm/keys/k"))


def test_ensure_user_without_passwd_defers_to_boot(tmp_path):
    assert systemd.ensure_user(tmp_path) is False
    assert (tmp_path / "etc/sysusers.d/llm.conf").exists()
    assert not (tmp_path / "etc/passwd").exists()


def test_systemctl_on_staging_tree(tmp_path):
    root = staging_root(tmp_path)
    systemd.install_units(root, manifest(), resolve)
    for verb in ("start", "restart", "daemon-reload", "stop"):
        with pytest.raises(InstallError, match="staging tree"):
            systemd.systemctl(verb, "llm@tiny.service", root=root)
    systemd.daemon_reload(root)  # nothing to reload: no error
    assert systemd.restart_instances(["tiny"], root=root) == []
    systemd.enable(["tiny"], root=root)  # real `systemctl --root=... enable`
    link = root / "etc/systemd/system/multi-user.target.wants/llm@tiny.service"
    assert link.is_symlink() and os.readlink(link).endswith("llm@.service")
    systemd.disable(["tiny"], root=root)
    assert not link.exists()


def test_status_and_curl(tmp_path):
    root = tmp_path / "root"
    systemd.install_units(root, manifest(), resolve)
    rows = health.instance_status(root)
    assert [r["instance"] for r in rows] == ["qwen3-32b", "tiny"]
    assert (
        rows[0]["port"] == 11434
        and rows[0]["version"] == "1.0"
        and rows[0]["url"] == "http://127.0.0.1:11434"
    )
    assert rows[1]["model"] == "tiny-chat" and rows[1]["active"] is None
    json.dumps(rows)
    table = health.format_status(rows)
    assert table.splitlines()[0].split() == [
        "INSTANCE",
        "VERSION",
        "ACTIVE",
        "PID",
        "PORT",
        "MODEL",
        "HEALTH",
    ]
    assert "qwen3-32b" in table and "11434" in table
    curl = health.curl_example(gpu_service(api_key_file="/etc/llm/keys/qwen.key"))
    assert curl.startswith("curl -sS http://127.0.0.1:11434/v1/chat/completions")
    assert '"model":"qwen3-32b"' in curl and "$(sudo cat /etc/llm/keys/qwen.key)" in curl
    assert "Authorization" not in health.curl_example(cpu_service())
    assert health.base_url("::", 8000) == "http://[::1]:8000"


# --------------------------------------------------------------------------- API keys and the service user


def with_systemd_version(root: Path, version: int) -> Path:
    """Give a staging tree a (stand-in) libsystemd-shared of ``version``, as Debian installs it."""
    lib = root / "usr/lib/x86_64-linux-gnu/systemd" / f"libsystemd-shared-{version}.so"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_bytes(b"")
    return root


def test_systemd_version_of_a_tree(tmp_path):
    assert systemd.systemd_version(tmp_path) is None and not systemd.uses_credentials(tmp_path)
    assert systemd.systemd_version(with_systemd_version(tmp_path / "old", 245)) == 245
    assert not systemd.uses_credentials(tmp_path / "old")
    assert systemd.uses_credentials(with_systemd_version(tmp_path / "new", 252))
    live = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split()[1]
    assert systemd.systemd_version(Path("/")) == int(live)


def test_api_key_reaches_the_service_as_a_credential(tmp_path):
    """systemd ≥ 248: LoadCredential= reads the key as root; the env file does not name the operator's file,
    and the drop-in passes `systemd-analyze verify`."""
    root = with_systemd_version(staging_root(tmp_path), 252)
    written = systemd.install_units(root, manifest(), resolve)
    dropin = root / "etc/systemd/system/llm@qwen3-32b.service.d/api-key.conf"
    assert dropin in written and not (root / "etc/systemd/system/llm@tiny.service.d/api-key.conf").exists()
    text = dropin.read_text()
    assert "LoadCredential=api-key:/etc/llm/keys/qwen.key\n" in text
    assert "Environment=LLM_API_KEY_FILE=%d/api-key\n" in text
    assert "LLM_API_KEY_FILE" not in (root / "etc/llm/qwen3-32b.env").read_text()
    r = analyze("verify", f"--root={root}", "llm@qwen3-32b.service")
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
    # the key dropped from the manifest: the drop-in goes; uninstall removes everything
    m = manifest()
    m["services"][0]["api_key_file"] = None
    systemd.install_units(root, m, resolve)
    assert not dropin.exists()
    systemd.install_units(root, manifest(), resolve)
    assert dropin in systemd.remove_units(root, ["qwen3-32b", "tiny"])
    assert not dropin.parent.exists()


def test_key_file_checks_with_credentials(tmp_path):
    root = with_systemd_version(tmp_path / "root", 252)
    key = root / "etc/llm/keys/k"
    problems = systemd.check_api_key_file(root, "/etc/llm/keys/k")
    assert problems == ["API key file /etc/llm/keys/k does not exist; the service cannot start until it does "
                        "(install -D -m 0600 -o root -g root KEYFILE /etc/llm/keys/k)"]
    key.parent.mkdir(parents=True)
    key.write_text("sk\n")
    key.chmod(0o600)
    assert systemd.check_api_key_file(root, "/etc/llm/keys/k") == []  # root:root 0600, no group needed
    key.chmod(0o604)
    assert "readable by every user" in systemd.check_api_key_file(root, "/etc/llm/keys/k")[0]


def test_key_file_without_credentials_needs_the_user_first(tmp_path):
    """systemd < 248 and no user llm yet: the key cannot be readable by it, and the remedy says what to do."""
    root = with_systemd_version(tmp_path / "root", 245)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    key = root / "etc/llm/keys/k"
    key.parent.mkdir(parents=True)
    key.write_text("sk\n")
    key.chmod(0o640)
    problems = systemd.check_api_key_file(root, "/etc/llm/keys/k")
    assert len(problems) == 1 and "the user does not exist yet" in problems[0]
    assert "useradd --system --user-group" in problems[0] and "chown root:llm /etc/llm/keys/k" in problems[0]


def _tree_with_llm(tmp_path: Path) -> tuple[Path, int, int]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    uid, gid = os.getuid() + 4242, os.getgid() + 4343
    (root / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/bash\nllm:x:{uid}:{gid}::/nonexistent:/bin/false\n")
    (root / "etc/group").write_text(f"root:x:0:\nllm:x:{gid}:\n")
    return root, uid, gid


def test_user_is_kept_while_files_reference_its_ids(tmp_path):
    root, uid, gid = _tree_with_llm(tmp_path)
    (root / "etc/sysusers.d").mkdir(parents=True)
    (root / "etc/sysusers.d/llm.conf").write_text("u llm -\n")
    key = root / "etc/llm/keys/k"
    key.parent.mkdir(parents=True)
    key.write_text("sk\n")
    os.chown(key, 0, gid)
    elsewhere = root / "srv/keys/other.key"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("sk\n")
    os.chown(elsewhere, uid, 0)
    assert systemd.files_owned_by_service_ids(root) == [Path("/etc/llm/keys/k")]
    assert systemd.files_owned_by_service_ids(root, ["/srv/keys/other.key"]) == [
        Path("/etc/llm/keys/k"), Path("/srv/keys/other.key")]
    remove, why = systemd.user_removal_decision(root, ["/srv/keys/other.key"])
    assert not remove and why.startswith("kept user llm and group llm: 2 file(s) still owned by them")
    before = tree_snapshot(root)
    assert systemd.remove_user(root, referenced=["/srv/keys/other.key"]) is False
    assert tree_snapshot(root) == before  # user, group, sysusers.d entry and the files are all kept
    os.chown(key, 0, 0)
    os.chown(elsewhere, 0, 0)
    assert systemd.user_removal_decision(root, ["/srv/keys/other.key"]) == (
        True, "no file is owned by user llm or group llm")


@pytest.mark.parametrize("name", ["tiny\n", "tiny\nExecStartPre=+/bin/sh", "a%i", "a;b", "$(id)", "a\x00"])
def test_instance_names_are_fullmatched(name):
    with pytest.raises(UsageError):
        systemd.unit_name(name)
    with pytest.raises(UsageError):
        render(cpu_service(name=name), CPU_ENV)


def test_cuda_with_a_newline_never_reaches_the_gpu_dropin():
    with pytest.raises(BundleError) as ei:
        systemd.render_devices_dropin({**GPU_ENV, "cuda": "12.8\nExecStartPre=+/bin/sh -c id"},
                                      nvidia_modprobe="/usr/bin/nvidia-modprobe")
    assert "environments[0].cuda" in str(ei.value) and "line break" in str(ei.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_api_key_credential_in_a_real_systemd():
    """In a booted Debian 12 (systemd 252, nspawn): the service gets the key from a root:root 0600 file through
    LoadCredential= (user llm cannot read the file itself); with the file gone the unit fails with 243,
    which the installer names."""
    from devkit.nspawn import Container, ensure_rootfs
    from tests.nspawn import fixtures

    fixtures.require_nspawn()
    m = {"bundle": {"name": "demo", "version": "1"}, "environments": [CPU_ENV],
         "services": [cpu_service(api_key_file="/etc/llm/keys/tiny.key")]}
    with Container(ensure_rootfs(), name="key-credential") as c:
        root = c.host_root
        assert systemd.uses_credentials(root)
        c.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "llm"])
        systemd.install_units(root, m, lambda s: systemd.InstancePaths(Path("/opt/llm/envs/cpu/x"), "/m"))
        c.write_file("/opt/llm/envs/cpu/x/bin/python", '#!/bin/bash\necho "$VLLM_API_KEY $LLM_API_KEY_FILE" > '
                     '"$HOME/seen"\nexec sleep 300\n', 0o755)
        c.run("install -D -m 0600 -o root -g root /dev/null /etc/llm/keys/tiny.key && "
              "echo sk-test-123 > /etc/llm/keys/tiny.key")
        assert c.run("runuser -u llm -- cat /etc/llm/keys/tiny.key", check=False).returncode != 0
        c.systemctl("daemon-reload")
        c.systemctl("start", "llm@tiny.service")
        deadline = time.monotonic() + 30
        while (r := c.run("cat /var/cache/llm/tiny/seen", check=False)).returncode and time.monotonic() < deadline:
            time.sleep(0.3)
        assert r.stdout.strip() == "sk-test-123 /run/credentials/llm@tiny.service/api-key"
        c.systemctl("stop", "llm@tiny.service")
        c.run("rm /etc/llm/keys/tiny.key")
        c.systemctl("start", "llm@tiny.service", check=False)
        deadline = time.monotonic() + 30
        while c.show("llm@tiny.service", "ExecMainStatus") != "243" and time.monotonic() < deadline:
            time.sleep(0.3)
        status = int(c.show("llm@tiny.service", "ExecMainStatus"))
        cause = health.explain_exit(status, c.show("llm@tiny.service", "Result"), [],
                                    key_file="/etc/llm/keys/tiny.key")
        print(f"missing key file: {cause}")
        assert cause.startswith("systemd could not load the API key file /etc/llm/keys/tiny.key (exit status 243")
