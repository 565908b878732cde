"""bench/scale.py end to end at tiny sizes, so the scale benchmark does not rot (the real run is by hand:
see README, "Performance at scale")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "scale.py"


def test_scale_bench_end_to_end(tmp_path):
    out = tmp_path / "scale.json"
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "8M,32M", "--probe", "4M", "--shard", "16M",
                        "--work", str(work), "--json", str(out), "--no-plots", "--no-drop-caches", "--no-sync"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert [x["asked_bytes"] for x in doc["results"]] == [4_000_000, 8_000_000, 32_000_000]
    assert [x["probe"] for x in doc["results"]] == [True, False, False]
    assert doc["results"][2]["files"] == 2 + 5  # two shards + config, generation config, tokenizer x2, index
    assert doc["page_cache"]["dropped"] is False and doc["machine"]["nproc"] >= 1
    for res in doc["results"]:
        assert set(res["stages"]) == {"build", "verify", "split", "install"}
        for stage in res["stages"].values():
            assert stage["contender"]["seconds"] > 0 and stage["baseline"]["seconds"] > 0
            assert stage["ratio"] > 0 and stage["contender"]["peak_rss"] > 0
        assert res["skipped"] == {}
        assert res["stages"]["install"]["placed_bytes"] >= res["size_bytes"]
        assert res["stages"]["split"]["volumes"] >= 1
    assert set(doc["checks"]) == {"build", "verify", "split", "install"}
    assert all(c["time"].startswith("not judged") for c in doc["checks"].values())  # nothing >= 1 GB
    assert "\ninstall " in r.stdout and "memory flat" in r.stdout
    assert not work.exists()  # every stage's output, the model and the store are gone

    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    r = subprocess.run([sys.executable, str(SCRIPT), "--plot-only", str(out), "--plots", str(plots)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("scale-time.png", "scale-rss.png", "scale-ratio.png"):
        p = plots / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000


def test_sizes_shrink_to_fit_the_disk():
    sys.path.insert(0, str(ROOT))
    from bench.scale import fit_sizes, parse_size

    assert parse_size("26G") == 26 * 10**9 and parse_size("8M") == 8 * 10**6 and parse_size("1.5G") == 15 * 10**8
    sizes, notes = fit_sizes([10**9, 26 * 10**9], free=30_500_000_000, slack=10 * 10**9)
    assert sizes == [10**9, 20 * 10**9] and "26G does not fit" in notes[0] and "using 20G" in notes[0]
    assert fit_sizes([10**9], free=10**12, slack=10 * 10**9) == ([10**9], [])


def _result(size: int, seconds: float, base_seconds: float, rss: int = 40 << 20, cpu: float | None = None) -> dict:
    def run(s: float) -> dict:
        return {"seconds": s, "cpu_s": s if cpu is None else cpu, "peak_rss": rss, "load_before": 1.0}

    return {"size_bytes": size, "stages": {"build": {"contender": run(seconds), "baseline": run(base_seconds),
                                                     "ratio": base_seconds / seconds}}}


def test_verdicts_flat_memory_and_linear_time():
    sys.path.insert(0, str(ROOT))
    from bench.scale_report import checks

    g = 10**9
    linear = [_result(n * g, n * 1.0 + 0.2, n * 1.1) for n in (1, 4, 16, 26)]
    c = checks(linear)["build"]
    assert c["memory_flat"] and c["time"] == "linear"
    # twice the cost per GB at 26 GB as at 1 GB, the baseline staying linear: flagged
    bent = [_result(n * g, n * (1 + n / 26), n * 1.1) for n in (1, 4, 16, 26)]
    assert checks(bent)["build"]["time"] == "VIOLATION"
    # the same bend in the baseline: the machine, not the tool
    both = [_result(n * g, n * (1 + n / 26), n * (1 + n / 26)) for n in (1, 4, 16, 26)]
    assert checks(both)["build"]["time"].startswith("bends with the baseline")
    grows = [_result(n * g, n * 1.0, n * 1.0, rss=(30 << 20) + n * (10 << 20)) for n in (1, 4, 16, 26)]
    assert not checks(grows)["build"]["memory_flat"]
