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


def _per_gb(rows: list[tuple[int, dict]], probe: tuple[int, dict] | None, who: str) -> list[float]:
    """Seconds per GB at each size; with a probe, the marginal rate (t - t_probe) / (size - size_probe), which
    leaves out the fixed cost (interpreter start, imports, signing) that a 1 GB run still carries."""
    n0, t0 = (probe[0], probe[1][who]["seconds"]) if probe else (0, 0.0)
    return [(s[who]["seconds"] - t0) / ((n - n0) / 1e9) for n, s in rows]


def checks(results: list[dict]) -> dict:
    """Memory flat (peak RSS spread within max(32 MiB, 25 %), probe included) and time linear: seconds per GB
    (from 1 GB up) at no size more than 1.3x what it is at a smaller one (cheaper per GB at a larger size is
    fine: fixed costs amortised); where it grows, whether the baseline on the same bytes grew as much (ratio
    steady: the machine, e.g. page cache vs disk, not the tool)."""
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
        growth = max((spg[j] / spg[i] for i in range(len(spg)) for j in range(i + 1, len(spg)) if spg[i] > 0),
                     default=0.0)
        ratio_spread = max(ratios) / min(ratios) if len(big) > 1 else 0.0
        if len(big) < 2:
            verdict = "not judged (needs two sizes >= 1 GB)"
        elif growth <= LINEAR_SPREAD:
            verdict = "linear"
        elif ratio_spread <= LINEAR_SPREAD:
            verdict = "bends with the baseline (the machine, not the tool: ratio steady)"
        else:
            verdict = "VIOLATION"
        out[stage] = {
            "peak_rss_mib": [round(x / 2**20, 1) for x in rss], "memory_flat": flat,
            "sizes_for_time": [n for n, _ in big], "s_per_gb": [round(x, 3) for x in spg],
            "baseline_s_per_gb": [round(x, 3) for x in bspg], "s_per_gb_spread": round(spread, 3),
            "s_per_gb_growth": round(growth, 3),
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
