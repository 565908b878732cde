"""Benchmark results: one row per concurrency (from ``vllm bench serve``'s result JSON or the built-in
client), the table ``llm-install bench`` prints, and the curve as an SVG drawn with the standard library.

Why SVG: the server has no matplotlib (the installer's runtime is the standard library and zstandard, and a
vLLM environment does not carry it either); an SVG needs nothing to write and any browser shows it. A PNG
is written only where matplotlib can be imported (``--plot FILE.png``), else the error says to use .svg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

METRICS = ("ttft", "tpot", "itl")
ROW_KEYS = ("concurrency", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
            "total_input_tokens", "total_output_tokens",
            *(f"{kind}_{m}_ms" for m in METRICS for kind in ("mean", "p99")))


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(*, concurrency: int, duration: float, completed: int, failed: int, total_input: int,
              total_output: int, ttfts: Sequence[float], tpots: Sequence[float], itls: Sequence[float],
              errors: Sequence[str] = ()) -> dict:
    """One row from per-request measurements in seconds (the built-in client's)."""
    row: dict = {"concurrency": concurrency, "completed": completed, "failed": failed,
                 "duration_s": round(duration, 3),
                 "request_throughput": completed / duration if duration > 0 else 0.0,
                 "output_throughput": total_output / duration if duration > 0 else 0.0,
                 "total_input_tokens": total_input, "total_output_tokens": total_output}
    for name, xs in (("ttft", ttfts), ("tpot", tpots), ("itl", itls)):
        row[f"mean_{name}_ms"] = 1000 * sum(xs) / len(xs) if xs else 0.0
        row[f"p99_{name}_ms"] = 1000 * percentile(xs, 99)
    if errors:
        row["errors"] = list(errors)
    return row


def from_vllm(doc: Mapping, concurrency: int) -> dict:
    """One row from ``vllm bench serve --save-result`` JSON (``--percentile-metrics ttft,tpot,itl
    --metric-percentiles 99``). Raises ValueError naming a missing field."""
    row: dict = {"concurrency": int(doc.get("max_concurrency") or concurrency)}
    source = {"duration_s": "duration"}
    for key in ROW_KEYS[1:]:
        name = source.get(key, key)
        if name not in doc:
            if key == "failed":
                row[key] = 0
                continue
            raise ValueError(f"vllm bench serve result has no {name!r}")
        v = doc[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"vllm bench serve result: {name!r} is not a number: {v!r}")
        row[key] = v
    return row


def format_table(rows: Sequence[Mapping]) -> str:
    """The plain table printed by ``llm-install bench``."""
    head = ["concurrency", "req/s", "output tok/s", "TTFT mean", "TTFT P99", "TPOT mean", "TPOT P99",
            "ITL mean", "ITL P99", "ok/failed"]
    table = [head, ["", "", "", "ms", "ms", "ms", "ms", "ms", "ms", ""]]
    for r in rows:
        table.append([str(r["concurrency"]), f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                      *(f"{r[f'{k}_{m}_ms']:.1f}" for m in METRICS for k in ("mean", "p99")),
                      f"{r['completed']}/{r.get('failed', 0)}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def svg_plot(rows: Sequence[Mapping], title: str) -> str:
    """Two panels over concurrency: output tok/s, and TTFT/TPOT mean in ms (an SVG document)."""
    W, H, pad = 760, 320, 56
    panel = (W - 3 * pad) / 2
    xs = [float(r["concurrency"]) for r in rows]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']

    def scale_x(x: float, x0: float) -> float:
        lo, hi = math.log2(min(xs)), math.log2(max(xs))
        return x0 + (panel * (math.log2(x) - lo) / (hi - lo) if hi > lo else panel / 2)

    def draw(x0: float, series: list[tuple[str, str, list[float]]], ylabel: str) -> None:
        top, bottom = 40.0, H - pad
        ymax = max((v for _, _, vs in series for v in vs), default=1.0) or 1.0
        out.append(f'<line x1="{x0}" y1="{bottom}" x2="{x0 + panel}" y2="{bottom}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>')
        out.append(f'<text x="{x0 - 8}" y="{top + 4}" text-anchor="end">{ymax:.3g}</text>')
        out.append(f'<text x="{x0 - 8}" y="{bottom}" text-anchor="end">0</text>')
        out.append(f'<text x="{x0 + panel / 2}" y="{H - 12}" text-anchor="middle">concurrency</text>')
        out.append(f'<text x="{x0 + 6}" y="{top - 6}">{escape(ylabel)}</text>')
        for x in xs:
            out.append(f'<text x="{scale_x(x, x0):.1f}" y="{bottom + 16}" text-anchor="middle">{x:g}</text>')
        for k, (name, colour, vs) in enumerate(series):
            pts = " ".join(f"{scale_x(x, x0):.1f},{bottom - (bottom - top) * v / ymax:.1f}" for x, v in zip(xs, vs))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for p in pts.split():
                cx, cy = p.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
            out.append(f'<text x="{x0 + panel - 4}" y="{top + 14 + 14 * k}" text-anchor="end" '
                       f'fill="{colour}">{escape(name)}</text>')

    draw(pad, [("output tok/s", "#1f77b4", [float(r["output_throughput"]) for r in rows])], "tokens/s")
    draw(2 * pad + panel, [("TTFT mean", "#d62728", [float(r["mean_ttft_ms"]) for r in rows]),
                           ("TPOT mean", "#2ca02c", [float(r["mean_tpot_ms"]) for r in rows])], "ms")
    out.append("</svg>")
    return "\n".join(out) + "\n"
