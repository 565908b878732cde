"""The verdicts and the table of a bench/scale.py run: is memory flat, is time linear; one line per stage x size."""

from __future__ import annotations

import statistics

STAGES = ("build", "verify", "split", "install")
FLAT_RSS_SLACK = 32 << 20
LINEAR_SPREAD = 1.3


def fmt_size(n: int) -> str:
    for unit, f in (("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n >= f:
            return f"{n / f:g}{unit}"
    return f"{n}B"


def _per_gb(rows: list[tuple[int, dict]], probe: tuple[int, dict] | None, who: str, what: str = "seconds"
            ) -> list[float]:
    """Seconds (wall, or ``what="cpu_s"``) per GB at each size; with a probe, the marginal rate
    (t - t_probe) / (size - size_probe), which leaves out the fixed cost (interpreter start, imports,
    signing) that a 1 GB run still carries."""
    n0, t0 = (probe[0], probe[1][who][what]) if probe else (0, 0.0)
    return [(s[who][what] - t0) / ((n - n0) / 1e9) for n, s in rows]


def _growth(sizes: list[int], xs: list[float]) -> float:
    """How much more per GB the largest size costs than the smallest, read off the least-squares line through
    (size, cost per GB): every size counts, so one unusually fast or slow run does not decide it alone
    (1.0: flat; below 1: cheaper per GB when larger)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(sizes), statistics.fmean(xs)
    slope = sum((n - mx) * (y - my) for n, y in zip(sizes, xs, strict=True)) / sum((n - mx) ** 2 for n in sizes)
    lo, hi = my + slope * (min(sizes) - mx), my + slope * (max(sizes) - mx)
    return hi / lo if lo > 0 else float("inf")


def checks(results: list[dict]) -> dict:
    """Memory flat (peak RSS spread within max(32 MiB, 25 %), probe included) and time linear: seconds per GB
    (from 1 GB up), on the line fitted through all sizes, at most 1.3x higher at the largest size than at the
    smallest (cheaper per GB at a larger size is fine: fixed costs amortised). Where wall time grows more, it
    is still no violation if the ratio to the baseline held (the machine bent both), or if the CPU seconds
    per GB grew no more than 1.3x, or no more than the baseline's did (the shared cores gave less, the tool
    did not do more per byte)."""
    out = {}
    for stage in STAGES:
        rows = [(r["size_bytes"], r["stages"][stage]) for r in results if stage in r["stages"]]
        if not rows:
            continue
        rss = [s["contender"]["peak_rss"] for _, s in rows]
        flat = max(rss) - min(rss) <= max(FLAT_RSS_SLACK, 0.25 * min(rss))
        probe = next(((r["size_bytes"], r["stages"][stage]) for r in results if r.get("probe")), None)
        big = [(n, s) for n, s in rows if n >= 10**9]
        spg = _per_gb(big, probe, "contender")
        bspg = _per_gb(big, probe, "baseline")
        ratios = [s["ratio"] for _, s in big]
        spread = max(spg) / min(spg) if len(big) > 1 and min(spg) > 0 else 0.0
        ns = [n for n, _ in big]
        growth = _growth(ns, spg)
        cpg, bcpg = _per_gb(big, probe, "contender", "cpu_s"), _per_gb(big, probe, "baseline", "cpu_s")
        cpu_growth, base_cpu_growth = _growth(ns, cpg), _growth(ns, bcpg)
        ratio_spread = max(ratios) / min(ratios) if len(big) > 1 else 0.0
        loads = [s["contender"]["load_before"] for _, s in big]
        if len(big) < 2:
            verdict = "not judged (needs two sizes >= 1 GB)"
        elif growth <= LINEAR_SPREAD:
            verdict = "linear"
        elif ratio_spread <= LINEAR_SPREAD:
            verdict = "bends with the baseline (the machine, not the tool: ratio steady)"
        elif cpu_growth <= max(LINEAR_SPREAD, base_cpu_growth * 1.1):
            verdict = (f"linear in CPU time (CPU s/GB grew {cpu_growth:.2f}x, the baseline's {base_cpu_growth:.2f}x); "
                       f"wall time noisy (shared cores, load average {min(loads):.1f}-{max(loads):.1f})")
        else:
            verdict = "VIOLATION"
        out[stage] = {
            "peak_rss_mib": [round(x / 2**20, 1) for x in rss], "memory_flat": flat,
            "sizes_for_time": [n for n, _ in big], "s_per_gb": [round(x, 3) for x in spg],
            "baseline_s_per_gb": [round(x, 3) for x in bspg], "s_per_gb_spread": round(spread, 3),
            "s_per_gb_growth": round(growth, 3),
            "cpu_s_per_gb": [round(x, 3) for x in cpg], "baseline_cpu_s_per_gb": [round(x, 3) for x in bcpg],
            "cpu_s_per_gb_growth": round(cpu_growth, 3), "baseline_cpu_s_per_gb_growth": round(base_cpu_growth, 3),
            "s_per_gb_basis": "marginal over the probe" if probe else "plain",
            "baseline_s_per_gb_spread": round(max(bspg) / min(bspg), 3) if len(big) > 1 and min(bspg) > 0 else 0.0,
            "ratio_spread": round(ratio_spread, 3),
            "s_per_gb_median": round(statistics.median(spg), 3) if spg else 0.0, "time": verdict,
            "time_linear": verdict != "VIOLATION",
        }
    return out


def print_table(doc: dict) -> None:
    print(f"\n{'stage':8} {'size':>6} {'seconds':>8} {'MB/s':>7} {'baseline s':>10} {'MB/s':>7} {'ratio':>6} "
          f"{'peak RSS':>9} {'base RSS':>9}")
    for r in doc["results"]:
        for stage, s in r["stages"].items():
            c, b = s["contender"], s["baseline"]
            size = fmt_size(r["asked_bytes"]) + ("*" if r.get("probe") else "")
            print(f"{stage:8} {size:>6} {c['seconds']:8.2f} {s['contender_mb_s']:7.0f} "
                  f"{b['seconds']:10.2f} {s['baseline_mb_s']:7.0f} {s['ratio']:5.2f}x "
                  f"{c['peak_rss'] / 2**20:5.0f} MiB {b['peak_rss'] / 2**20:5.0f} MiB")
    for r in doc["results"]:
        for stage, why in r.get("skipped", {}).items():
            print(f"{stage:8} {fmt_size(r['asked_bytes']):>6} skipped: {why}")
    print()
    for stage, c in doc["checks"].items():
        mem = "flat" if c["memory_flat"] else "VIOLATION (grows with size)"
        print(f"{stage:8} memory {mem}: {c['peak_rss_mib']} MiB; time {c['time']}: s/GB {c['s_per_gb']} "
              f"(baseline {c['baseline_s_per_gb']})")
    if any(r.get("probe") for r in doc["results"]):
        print("* probe size: its times are the fixed cost; s/GB above is marginal over it")
