#!/usr/bin/env python3
"""Benchmark `pack build` and `pack verify` against hashing baselines on the same files, same run.

    .venv/bin/python bench/build_verify.py [--size-gb 2.2] [--work /tmp/llm-bench] [--runs 1]

Builds a bundle from a local model directory of random "weights" (>= 2 GB by default) and prints, next
to each other: coreutils `sha256sum` over the files, Python `hashlib.sha256` in two processes (the
baseline), `pack build` (fresh content store: copy + hash + assemble + sign) and `pack verify`
(signature + every hash), as MB/s, ratio to the baseline, and peak RSS of the whole process tree.
The files are read once beforehand so every contender sees warm page cache (the machine's disk speed
is a separate question: see the README). Timed runs are not sampled: polling /proc every 20 ms cost
the sampled command 0.05-0.07 s of a 1 s run on 2 cores, a handicap the in-process baselines do not
carry. Peak RSS comes from one extra, sampled run of each `pack` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def make_model(d: Path, total: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    n_files = 4
    per = total // n_files
    files = []
    for i in range(n_files):
        p = d / f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        if not p.exists() or p.stat().st_size != per:
            with open(p, "wb") as f:
                left = per
                k = 0
                while left:
                    chunk = block[: min(left, len(block))]
                    f.write(i.to_bytes(4, "little") + k.to_bytes(4, "little") + chunk[8:])
                    left -= len(chunk)
                    k += 1
        files.append(p)
    cfg = d / "config.json"
    cfg.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 8}))
    return [*files, cfg]


def run_timed(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of ``cmd`` (nothing else running in this process meanwhile)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout.decode(errors='replace')}")
    return secs


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes) of the whole process tree, sampled every 20 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode(errors='replace')}")
    return secs, peak, out.decode(errors="replace")


def _h(p: str) -> str:
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def hashlib_two_procs(files: list[Path]) -> float:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_h, [str(f) for f in sorted(files, key=lambda f: -f.stat().st_size)]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llm-bench"))
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()

    work = args.work
    model = work / "model"
    files = make_model(model, int(args.size_gb * 1e9))
    total = sum(f.stat().st_size for f in files)
    (work / "keys").mkdir(parents=True, exist_ok=True)
    key = work / "keys" / "bench"
    if not key.with_suffix(".key").exists():
        subprocess.run([sys.executable, "-m", "packager.cli", "keygen", "--out", str(key)], check=True,
                       capture_output=True)
    manifest = work / "bench.yaml"
    manifest.write_text(f"bundle: {{name: bench, version: '1'}}\nmodels:\n"
                        f"  - {{name: m, source: local, path: {model}}}\n")
    for f in files:  # warm the page cache for everyone
        with open(f, "rb") as fh:
            while fh.read(8 << 20):
                pass

    rows: list[tuple[str, float, int | None]] = []
    rss: dict[str, int] = {}
    for run in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        rows.append(("sha256sum (coreutils, 1 process)", time.perf_counter() - t0, None))
        rows.append(("hashlib.sha256, 2 processes (baseline)", hashlib_two_procs(files), None))
        store, out = work / f"store-{run}", work / f"out-{run}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, LLM_PACK_STORE=str(store), PYTHONPATH=str(ROOT))
        build_cmd = [sys.executable, "-m", "packager.cli", "build", str(manifest), "--key", f"{key}.key",
                     "--out", str(out), "--no-progress", "-j", "2"]
        verify_cmd = [sys.executable, "-m", "packager.cli", "verify", str(out / "bench-1"), "--pubkey",
                      f"{key}.pub", "-j", "2"]
        rows.append(("pack build (fresh store)", run_timed(build_cmd, env), None))
        rows.append(("pack build (again, store warm)", run_timed(build_cmd, env), None))
        rows.append(("pack verify", run_timed(verify_cmd, env), None))
        if run == 0:  # peak RSS: one sampled run each (fresh store again for the build)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            rss["pack build (fresh store)"] = run_measured(build_cmd, env)[1]
            rss["pack build (again, store warm)"] = run_measured(build_cmd, env)[1]
            rss["pack verify"] = run_measured(verify_cmd, env)[1]
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    best: dict[str, float] = {}
    for name, secs, _ in rows:
        best[name] = min(secs, best.get(name, secs))
    base = best["hashlib.sha256, 2 processes (baseline)"]
    print(f"{total / 1e9:.2f} GB in {len(files)} files, {os.cpu_count()} cores, best of {args.runs} run(s)")
    print(f"{'':42} {'seconds':>8} {'MB/s':>8} {'vs base':>8} {'peak RSS':>9}")
    for name, secs in best.items():
        rss_s = f"{rss[name] / 2**20:.0f} MiB" if name in rss else "-"
        print(f"{name:42} {secs:8.2f} {total / secs / 1e6:8.0f} {base / secs:7.2f}x {rss_s:>9}")
    if args.runs > 1:
        print("every run, vs its own baseline:")
        per_run = [rows[i:i + 5] for i in range(0, len(rows), 5)]
        for name in list(best)[2:]:
            ratios = [r[1][1] / next(x for x in r if x[0] == name)[1] for r in per_run]
            print(f"  {name:40} " + " ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    main()
