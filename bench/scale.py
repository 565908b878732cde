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
The disk is shared: a size runs if its model fits with --disk-slack to spare; split and install (a second
copy) only if it still does with the model on disk; any command is killed before the free space falls
below --disk-floor; what was skipped is printed and recorded. A tiny --probe size runs first: each stage's
fixed cost. Memory must be flat (peak RSS independent of size) and time linear (cost per GB from 1 GB up
steady, bench/scale_report.py); violations are printed and recorded (--strict: exit 1). --repeat N keeps
the best of N alternating rounds (this machine's cores are shared: one round can be 1.8x another).
Results: bench/results/scale-<date>.json; plots (bench extra: matplotlib) into docs/perf/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scale_measure  # noqa: E402
from bench.scale_measure import DiskGuard, Run, drop_caches, git_commit, machine_info, measure, remove  # noqa: E402
from bench.scale_model import DiskLow, make_model  # noqa: E402
from bench.scale_report import STAGES, checks, fmt_size, print_table  # noqa: E402

DEFAULT_SIZES = "1G,4G,16G,26G"
SKIP = "driver,gpus,gpu-memory,compute-capability,systemd,ports,api-keys"
LABELS = {
    "build": ("pack build", "hashlib.sha256 x2 procs"),
    "verify": ("pack verify", "hashlib.sha256 x2 procs"),
    "split": ("pack split", "cp -r + sha256sum"),
    "install": ("installer install", "cp -r + sha256sum"),
}
HASH_BASELINE = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                 "from bench.build_verify import hashlib_two_procs; hashlib_two_procs([Path(p) for p in sys.argv[2:]])")
# The disk is shared with other work. A size is run when the model fits with SLACK to spare (build and verify
# add only a few KB: the bundle hardlinks the model); split and install, which write a second copy, run when,
# with the model on disk, COPY_FACTOR x size (the installer's preflight wants 1.1x) + SLACK is free; every
# command is killed before the free space falls below FLOOR (bench/scale_measure.py).
COPY_FACTOR = 1.1
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """``26G`` -> 26e9 bytes (K/M/G/T are powers of 1000 here, as model sizes are quoted)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8M, 1G, 26G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fit_sizes(sizes: list[int], free: int, slack: int) -> tuple[list[int], list[str]]:
    """The sizes whose model fits with ``slack`` to spare; one that does not is replaced by the largest whole
    GB that does."""
    out, notes = [], []
    for size in sizes:
        if size + slack <= free:
            out.append(size)
            continue
        fit = (free - slack) // 10**9 * 10**9
        notes.append(f"{fmt_size(size)} does not fit: {free / 1e9:.1f} GB free < size + {slack / 1e9:.0f} GB slack; "
                     + (f"using {fmt_size(fit)}" if fit > 0 else "dropped"))
        if fit > 0:
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
    def __init__(self, work: Path, cold: bool, jobs: str, split_size: str, slack: int, floor: int,
                 repeat: int = 1, stages: tuple[str, ...] = STAGES) -> None:
        self.work, self.cold, self.jobs, self.split_size = work, cold, jobs, split_size
        self.repeat, self.stages = repeat, stages
        self.slack, self.guard = slack, (work, floor)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_STORE=str(work / "store"))
        self.key = work / "keys" / "scale"
        self.model, self.out = work / "model", work / "out"
        self.bundle = self.out / "scale-1"
        self.key.parent.mkdir(parents=True, exist_ok=True)
        measure(py("-m", "packager.cli", "keygen", "--out", self.key, "--force"), env=self.env)

    def run(self, cmd: list[str], inputs: list[Path], cold: bool | None = None) -> Run:
        cold = self.cold if cold is None else cold
        if not cold:
            warm(inputs)
        return measure(cmd, env=self.env, cold=cold, cwd=ROOT, guard=self.guard)

    def hash_baseline(self, files: list[Path]) -> Run:
        return self.run(py("-c", HASH_BASELINE, ROOT, *files), files)

    def copy_and_sum(self, src: Path, dest: Path) -> tuple[Run, dict]:
        """``cp -r SRC DEST`` then ``sha256sum`` of every copied file (the copy is still in the page cache
        where it fits, as it would be for anyone doing this by hand)."""
        try:
            cp = self.run(["cp", "-r", "--", str(src), str(dest)], files_under(src))
            copied = files_under(dest)
            sums = self.run(["sha256sum", "--", *map(str, copied)], copied, cold=False)
        finally:
            remove(dest)
        return Run.combine([cp, sums]), {"baseline_steps": {"cp": cp, "sha256sum": sums}}

    def pair(self, contender, baseline) -> dict:
        """``self.repeat`` rounds of contender and baseline, alternating which goes first; the fastest of each
        is kept (peak RSS: the largest of all rounds), every round's seconds recorded."""
        runs: dict[str, list] = {"contender": [], "baseline": []}
        extra: dict = {}
        for i in range(self.repeat):
            for who in (("baseline", "contender") if i % 2 == 0 else ("contender", "baseline")):
                got = (contender if who == "contender" else baseline)()
                run, more = got if isinstance(got, tuple) else (got, {})
                runs[who].append((run, more))
        row: dict = {"rounds": {w: [round(r.seconds, 3) for r, _ in rs] for w, rs in runs.items()}}
        for who, rs in runs.items():
            best, more = min(rs, key=lambda x: x[0].seconds)
            best.peak_rss = max(r.peak_rss for r, _ in rs)
            row[who] = best
            extra |= more
        return row | extra

    def build(self, files: list[Path]) -> dict:
        manifest = self.work / "scale.yaml"
        manifest.write_text(f"bundle: {{name: scale, version: '1'}}\nmodels:\n"
                            f"  - {{name: m, source: local, path: {self.model}}}\n")

        def contender() -> Run:
            remove(self.work / "store")  # a fresh store and output every time
            remove(self.out)
            return self.run(py("-m", "packager.cli", "build", manifest, "--key", self.key.with_suffix(".key"),
                               "--out", self.out, "--no-progress", "-j", self.jobs), files)

        return self.pair(contender, lambda: self.hash_baseline(files))

    def verify(self, bfiles: list[Path]) -> dict:
        return self.pair(lambda: self.run(py("-m", "packager.cli", "verify", self.bundle, "--pubkey",
                                             self.key.with_suffix(".pub"), "-j", self.jobs), bfiles),
                         lambda: self.hash_baseline(bfiles))

    def split(self, bfiles: list[Path]) -> dict:
        vols = self.work / "volumes"

        def contender() -> tuple[Run, dict]:
            try:
                run = self.run(py("-m", "packager.cli", "split", self.bundle, "--size", self.split_size, "--out",
                                  vols), bfiles)
                return run, {"volumes": len([d for d in vols.iterdir() if d.is_dir()])}
            finally:
                remove(vols)

        return self.pair(contender, lambda: self.copy_and_sum(self.bundle, self.work / "bundle-copy"))

    def install(self, bfiles: list[Path]) -> dict:
        root = self.work / "root"

        def contender() -> tuple[Run, dict]:
            remove(root)
            (root / "etc").mkdir(parents=True)
            try:
                run = self.run(py("-m", "installer", "install", "--bundle", self.bundle, "--root", root, "--pubkey",
                                  self.key.with_suffix(".pub"), "--skip-check", SKIP), bfiles)
                return run, {"placed_bytes": sum(f.stat().st_size for f in files_under(root / "opt"))}
            finally:
                remove(root)

        return self.pair(contender, lambda: self.copy_and_sum(self.model, self.work / "model-copy"))

    def size(self, total: int, shard: int) -> dict:
        t0 = time.perf_counter()
        try:
            make_model(self.model, total, shard, floor=self.guard[1], sync=scale_measure.SYNC)  # streaming, flat memory
        except DiskLow as e:
            raise DiskGuard(f"writing the model: {e}") from e
        gen_s = time.perf_counter() - t0
        files = files_under(self.model)
        nbytes = sum(f.stat().st_size for f in files)
        stages: dict[str, dict] = {"build": self.build(files)}  # always: the others need its bundle
        bfiles = files_under(self.bundle)
        if "verify" in self.stages:
            stages["verify"] = self.verify(bfiles)
        skipped: dict[str, str] = {}
        for name, stage in (("split", self.split), ("install", self.install)):
            if name not in self.stages:
                continue
            need, free = COPY_FACTOR * nbytes + self.slack, shutil.disk_usage(self.work).free
            if free < need:
                skipped[name] = (f"a second copy does not fit: {free / 1e9:.1f} GB free beside the model < "
                                 f"{COPY_FACTOR} x {fmt_size(nbytes)} + {fmt_size(self.slack)} slack")
                print(f"  {name:8} skipped: {skipped[name]}", flush=True)
                continue
            try:
                stages[name] = stage(bfiles)
            except DiskGuard as e:
                skipped[name] = f"given up: the disk filled while it ran ({e})"
                print(f"  {name:8} skipped: {skipped[name]}", flush=True)
        remove(self.out)
        remove(self.work / "store")
        result = {"size_bytes": nbytes, "asked_bytes": total, "files": len(files), "generate_s": gen_s,
                  "stages": {}, "skipped": skipped}
        for name, st in stages.items():
            c, b, steps = st["contender"], st["baseline"], st.get("baseline_steps")
            row = {k: v for k, v in st.items() if k not in ("contender", "baseline", "baseline_steps")}
            row |= {"contender": c.to_dict(), "baseline": b.to_dict(),
                    "contender_mb_s": nbytes / c.seconds / 1e6, "baseline_mb_s": nbytes / b.seconds / 1e6,
                    "ratio": b.seconds / c.seconds}
            if steps:
                row["baseline_steps"] = {k: v.to_dict() for k, v in steps.items()}
                row["ratio_vs_cp_alone"] = steps["cp"].seconds / c.seconds
            result["stages"][name] = row
        return result


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
    ap.add_argument("--disk-slack", type=parse_size, default=parse_size("10G"),
                    help="free space to leave to other users of the disk when deciding what to run (default 10G)")
    ap.add_argument("--disk-floor", type=parse_size, default=parse_size("5G"),
                    help="kill a command before the free space falls below this (default 5G)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="which stages to measure (default all; build always runs: the others need its bundle)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per stage, contender and baseline alternating who goes first; best kept (default 1)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-sync", action="store_true",
                    help="no sync after runs (smoke tests on a busy disk; written bytes then may not count)")
    ap.add_argument("--no-drop-caches", action="store_true", help="never drop the page cache (warm the inputs)")
    ap.add_argument("--plot-only", type=Path, metavar="JSON", help="only draw the plots of a results file")
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="only print a results file's table, its verdicts derived again from its measurements "
                    "(written back into it when they changed); several files: their sizes together (e.g. runs "
                    "of other sizes with --repeat), nothing written")
    ap.add_argument("--strict", action="store_true", help="exit 1 when memory is not flat or time not linear")
    args = ap.parse_args(argv)
    if args.report:
        docs = [json.loads(p.read_text()) for p in args.report]
        doc = docs[0] | {"results": sorted((r for d in docs for r in d["results"]), key=lambda r: r["size_bytes"])}
        again = checks(doc["results"])
        if len(docs) == 1 and again != doc["checks"]:
            doc["checks"] = again
            doc["checks_derived_by"] = f"bench/scale.py --report at {git_commit(ROOT)}"
            args.report[0].write_text(json.dumps(doc, indent=1) + "\n")
        print_table(doc | {"checks": again})
        return 0
    if args.plot_only:
        from bench.scale_plot import plot

        for p in plot(json.loads(args.plot_only.read_text()), args.plots):
            print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} KB)")
        return 0
    scale_measure.SYNC = not args.no_sync
    asked = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(work)
    sizes, notes = fit_sizes(sorted(asked), machine["disk_free_bytes_at_start"], args.disk_slack)
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
                        "split_size": args.split_size, "jobs": args.jobs, "skip_checks": SKIP,
                        "disk_slack": args.disk_slack, "disk_floor": args.disk_floor,
                        "repeat": args.repeat, "stages": args.stages, "sync": not args.no_sync},
           "labels": LABELS, "results": [], "checks": {}}
    stages = tuple(s for s in STAGES if s == "build" or s in args.stages.split(","))
    bench = Bench(work, cold, args.jobs, args.split_size, args.disk_slack, args.disk_floor, args.repeat, stages)
    try:
        for total in sizes:
            now, late = fit_sizes([total], shutil.disk_usage(work).free, args.disk_slack)  # shared: ask again
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
            try:
                r = bench.size(total, args.shard)
            except DiskGuard as e:
                print(f"disk: {fmt_size(total)} given up: {e}")
                doc["settings"]["disk_notes"].append(f"{fmt_size(total)} given up while running: {e}")
                break
            r["larger_than_ram"] = r["size_bytes"] > machine["ram_bytes"]
            r["probe"] = bool(args.probe) and total == args.probe
            doc["results"].append(r)
            remove(bench.model)
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
