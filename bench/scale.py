#!/usr/bin/env python3
"""Scale benchmark: pack build, pack verify, pack split and the installer at model sizes up to beyond RAM.

    .venv/bin/python bench/scale.py                       # 1G,4G,16G,26G (the largest shrinks to fit the disk)
    .venv/bin/python bench/scale.py --sizes 1G,4G         # a quick run
    .venv/bin/python bench/scale.py --plot-only bench/results/scale-2026-12-02.json

For each size a local model directory (config.json, tokenizer files, safetensors shards of incompressible
data, see bench/scale_model.py) is written, then each stage runs next to a baseline on the same bytes,
in the same run, one after the other:

  build    `pack build` of a model-only manifest, fresh content store, signed (key from `pack keygen`)
           vs hashlib.sha256 in 2 processes over the model files (bench/build_verify.py's helper)
  verify   `pack verify --pubkey`                      vs the same hashing baseline over the bundle's files
  split    `pack split --size 4G`                      vs `cp -r` of the bundle, then `sha256sum` of the copy
  install  `python -m installer install --root R --pubkey K --skip-check <the GPU/systemd/port checks>`
           (verify signature + hashes, copy into R/opt/llm, switch) vs `cp -r` of the model + `sha256sum`

Every contender and baseline is a fresh process tree, measured alike (bench/scale_measure.py): wall time
including a `sync` after it (so written bytes count), CPU time, peak RSS of the whole tree. The page cache
is dropped before each run when /proc/sys/vm/drop_caches is writable (root): every run starts cold, the
same at 1 GB and beyond RAM; otherwise the inputs are read once first (warm where they fit). ratio =
baseline seconds / contender seconds (> 1: faster than the baseline). Each stage's outputs are deleted as
soon as it is timed, so at most the model (the bundle hardlinks it) and one copy exist at a time.
Memory must be flat (peak RSS independent of size) and time linear (seconds per GB steady from 1 GB up);
violations are printed and recorded (--strict: exit 1). Results: bench/results/scale-<date>.json; plots
(bench extra: matplotlib) into docs/perf/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_measure import Run, drop_caches, git_commit, machine_info, measure, remove  # noqa: E402
from bench.scale_model import make_model  # noqa: E402

DEFAULT_SIZES = "1G,4G,16G,26G"
SKIP = "driver,gpus,gpu-memory,compute-capability,systemd,ports,api-keys"
STAGES = ("build", "verify", "split", "install")
LABELS = {
    "build": ("pack build", "hashlib.sha256 x2 procs"),
    "verify": ("pack verify", "hashlib.sha256 x2 procs"),
    "split": ("pack split", "cp -r + sha256sum"),
    "install": ("installer install", "cp -r + sha256sum"),
}
HASH_BASELINE = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                 "from bench.build_verify import hashlib_two_procs; hashlib_two_procs([Path(p) for p in sys.argv[2:]])")
# disk for the stages kept at once: the model + one copy of it, and the installer's preflight wants 1.1x the
# model free beside the model; plus slack for other users of the disk
DISK_FACTOR, DISK_SLACK = 2.1, 2_000_000_000
FLAT_RSS_SLACK = 32 << 20
LINEAR_SPREAD = 1.3
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """``26G`` -> 26e9 bytes (K/M/G/T are powers of 1000 here, as model sizes are quoted)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8M, 1G, 26G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_size(n: int) -> str:
    for unit, f in (("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n >= f:
            return f"{n / f:g}{unit}"
    return f"{n}B"


def fit_sizes(sizes: list[int], free: int) -> tuple[list[int], list[str]]:
    """The sizes the disk holds (model + one copy + the installer's margin); a size that does not fit is
    replaced by the largest whole GB that does."""
    out, notes = [], []
    room = int((free - DISK_SLACK) / DISK_FACTOR)
    for s in sizes:
        if s <= room:
            out.append(s)
            continue
        fit = room // 10**9 * 10**9
        notes.append(f"{fmt_size(s)} does not fit: {free / 1e9:.1f} GB free < {DISK_FACTOR} x size + "
                     f"{DISK_SLACK / 1e9:.0f} GB; " + (f"using {fmt_size(fit)}" if fit > 0 else "dropped"))
        if fit > 0 and fit not in out:
            out.append(fit)
    return sorted(set(out)), notes


def py(*args: str | Path) -> list[str]:
    return [sys.executable, *map(str, args)]


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and not p.is_symlink())


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass


class Bench:
    def __init__(self, work: Path, cold: bool, jobs: int, split_size: str) -> None:
        self.work, self.cold, self.jobs, self.split_size = work, cold, jobs, split_size
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_STORE=str(work / "store"))
        self.key = work / "keys" / "scale"
        if not self.key.with_suffix(".pub").exists():
            self.key.parent.mkdir(parents=True, exist_ok=True)
            measure(py("-m", "packager.cli", "keygen", "--out", self.key, "--force"), env=self.env)

    def run(self, cmd: list[str], inputs: list[Path], cold: bool | None = None) -> Run:
        cold = self.cold if cold is None else cold
        if not cold:
            warm(inputs)
        return measure(cmd, env=self.env, cold=cold, cwd=ROOT)

    def hash_baseline(self, files: list[Path]) -> Run:
        return self.run(py("-c", HASH_BASELINE, ROOT, *files), files)

    def copy_and_sum(self, src: Path, dest: Path) -> tuple[Run, dict[str, Run]]:
        """``cp -r SRC DEST`` then ``sha256sum`` of every copied file (the copy is still in the page cache
        where it fits, as it would be for anyone doing this by hand)."""
        inputs = files_under(src)
        cp = self.run(["cp", "-r", "--", str(src), str(dest)], inputs)
        copied = files_under(dest)
        sums = self.run(["sha256sum", "--", *map(str, copied)], copied, cold=False) if copied else cp
        remove(dest)
        return Run.combine([cp, sums]), {"cp": cp, "sha256sum": sums}

    def size(self, total: int, shard: int) -> dict:
        model, out = self.work / "model", self.work / "out"
        t0 = time.perf_counter()
        make_model(model, total, shard)  # streaming, constant memory; synced
        gen_s = time.perf_counter() - t0
        files = files_under(model)
        nbytes = sum(f.stat().st_size for f in files)
        manifest = self.work / "scale.yaml"
        manifest.write_text(f"bundle: {{name: scale, version: '1'}}\nmodels:\n"
                            f"  - {{name: m, source: local, path: {model}}}\n")
        stages: dict[str, dict] = {}
        # build: fresh store and output every time
        remove(self.work / "store")
        remove(out)
        base = self.hash_baseline(files)
        cont = self.run(py("-m", "packager.cli", "build", manifest, "--key", self.key.with_suffix(".key"),
                           "--out", out, "--no-progress", "-j", self.jobs), files)
        stages["build"] = {"contender": cont, "baseline": base}
        bundle = out / "scale-1"
        bfiles = files_under(bundle)
        base = self.hash_baseline(bfiles)
        cont = self.run(py("-m", "packager.cli", "verify", bundle, "--pubkey", self.key.with_suffix(".pub"),
                           "-j", self.jobs), bfiles)
        stages["verify"] = {"contender": cont, "baseline": base}
        base, steps = self.copy_and_sum(bundle, self.work / "bundle-copy")
        vols = self.work / "volumes"
        cont = self.run(py("-m", "packager.cli", "split", bundle, "--size", self.split_size, "--out", vols), bfiles)
        n_vols = len([d for d in vols.iterdir() if d.is_dir()])
        remove(vols)
        stages["split"] = {"contender": cont, "baseline": base, "baseline_steps": steps, "volumes": n_vols}
        base, steps = self.copy_and_sum(model, self.work / "model-copy")
        root = self.work / "root"
        remove(root)
        (root / "etc").mkdir(parents=True)
        cont = self.run(py("-m", "installer", "install", "--bundle", bundle, "--root", root, "--pubkey",
                           self.key.with_suffix(".pub"), "--skip-check", SKIP), bfiles)
        placed = sum(f.stat().st_size for f in files_under(root / "opt"))
        remove(root)
        stages["install"] = {"contender": cont, "baseline": base, "baseline_steps": steps, "placed_bytes": placed}
        remove(out)
        remove(self.work / "store")
        result = {"size_bytes": nbytes, "asked_bytes": total, "files": len(files), "generate_s": gen_s,
                  "stages": {}}
        for name, s in stages.items():
            c, b = s["contender"], s["baseline"]
            row = {k: v for k, v in s.items() if k not in ("contender", "baseline", "baseline_steps")}
            row |= {"contender": c.to_dict(), "baseline": b.to_dict(),
                    "contender_mb_s": nbytes / c.seconds / 1e6, "baseline_mb_s": nbytes / b.seconds / 1e6,
                    "ratio": b.seconds / c.seconds}
            if "baseline_steps" in s:
                row["baseline_steps"] = {k: v.to_dict() for k, v in s["baseline_steps"].items()}
                row["ratio_vs_cp_alone"] = s["baseline_steps"]["cp"].seconds / c.seconds
            result["stages"][name] = row
        return result


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
    print()
    for stage, c in doc["checks"].items():
        mem = "flat" if c["memory_flat"] else "VIOLATION (grows with size)"
        print(f"{stage:8} memory {mem}: {c['peak_rss_mib']} MiB; time {c['time']}: s/GB {c['s_per_gb']} "
              f"(baseline {c['baseline_s_per_gb']})")
    if any(r.get("probe") for r in doc["results"]):
        print("* probe size: its times are the fixed cost; s/GB above is marginal over it")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"model sizes, comma-separated (default {DEFAULT_SIZES})")
    ap.add_argument("--probe", type=parse_size, default=parse_size("8M"),
                    help="a tiny size run first to measure each stage's fixed cost (default 8M; 0: none)")
    ap.add_argument("--shard", type=parse_size, default=parse_size("2G"), help="largest shard (default 2G)")
    ap.add_argument("--split-size", default="4G", help="pack split --size (default 4G)")
    ap.add_argument("--jobs", "-j", default="2", help="-j for pack build/verify (default 2, as the baseline)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llm-scale"), help="scratch directory (deleted after)")
    ap.add_argument("--json", type=Path, help="results file (default bench/results/scale-<date>.json)")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "perf", help="PNG directory (default docs/perf)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-drop-caches", action="store_true", help="never drop the page cache (warm the inputs)")
    ap.add_argument("--plot-only", type=Path, metavar="JSON", help="only draw the plots of a results file")
    ap.add_argument("--strict", action="store_true", help="exit 1 when memory is not flat or time not linear")
    args = ap.parse_args(argv)
    if args.plot_only:
        from bench.scale_plot import plot

        for p in plot(json.loads(args.plot_only.read_text()), args.plots):
            print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} KB)")
        return 0
    asked = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(work)
    sizes, notes = fit_sizes(sorted(asked), machine["disk_free_bytes_at_start"])
    if args.probe and sizes and args.probe < sizes[0]:
        sizes.insert(0, args.probe)
    cold = not args.no_drop_caches and drop_caches()
    cache = ("dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches): all runs start cold" if cold
             else "not dropped (" + ("--no-drop-caches" if args.no_drop_caches else "drop_caches not writable")
             + "): inputs read once before each run, warm where they fit in RAM")
    for n in notes:
        print(f"disk: {n}")
    print(f"sizes {', '.join(map(fmt_size, sizes))}; {machine['nproc']} cores, RAM {machine['ram_bytes'] / 2**30:.1f} "
          f"GiB, {machine['disk_free_bytes_at_start'] / 1e9:.0f} GB free in {work}; page cache {cache}", flush=True)
    today = dt.date.today().isoformat()
    out_json = args.json or ROOT / "bench" / "results" / f"scale-{today}.json"
    doc = {"benchmark": "bench/scale.py", "date": today, "argv": sys.argv[1:] if argv is None else argv,
           "git": git_commit(ROOT), "machine": machine, "page_cache": {"dropped": cold, "how": cache},
           "settings": {"sizes_asked": asked, "sizes_planned": sizes, "disk_notes": notes, "shard_bytes": args.shard,
                        "split_size": args.split_size, "jobs": args.jobs, "skip_checks": SKIP},
           "labels": LABELS, "results": [], "checks": {}}
    bench = Bench(work, cold, args.jobs, args.split_size)
    try:
        for total in sizes:
            now, late = fit_sizes([total], shutil.disk_usage(work).free)  # the disk is shared: ask again
            done = [r["asked_bytes"] for r in doc["results"]]
            if not now or any(n <= d for n in now for d in done):
                late.append(f"{fmt_size(total)} skipped")
            for n in late:
                print(f"disk: {n}")
            doc["settings"]["disk_notes"] += [f"at run time: {n}" for n in late]
            if not now or any(n <= d for n in now for d in done):
                continue
            total = now[0]
            what = " (fixed-cost probe)" if total == args.probe else ""
            print(f"--- {fmt_size(total)}{what} (load {os.getloadavg()[0]:.1f})", flush=True)
            r = bench.size(total, args.shard)
            r["larger_than_ram"] = r["size_bytes"] > machine["ram_bytes"]
            r["probe"] = bool(args.probe) and total == args.probe
            doc["results"].append(r)
            remove(work / "model")
            for stage, s in r["stages"].items():
                print(f"  {stage:8} {s['contender']['seconds']:7.2f} s  {s['contender_mb_s']:6.0f} MB/s  "
                      f"ratio {s['ratio']:.2f}x  peak RSS {s['contender']['peak_rss'] / 2**20:.0f} MiB", flush=True)
            doc["checks"] = checks(doc["results"])
            doc["load_average_at_end"] = list(os.getloadavg())
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        remove(work)
    print_table(doc)
    print(f"\nwrote {out_json}")
    if not args.no_plots and doc["results"]:
        from bench.scale_plot import plot

        for p in plot(doc, args.plots):
            print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} KB)")
    bad = [s for s, c in doc["checks"].items() if not (c["memory_flat"] and c["time_linear"])]
    if bad:
        print(f"VIOLATION in: {', '.join(bad)}")
    return 1 if bad and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
