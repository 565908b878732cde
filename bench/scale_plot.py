"""Plots of a bench/scale.py results file (matplotlib, the `bench` extra): time, peak RSS and ratio vs size.

    scale-time.png   seconds vs model size per stage, contender (solid) and its baseline (dashed)
    scale-rss.png    peak RSS of the process tree vs model size per stage (contender solid, baseline dashed)
    scale-ratio.png  baseline seconds / contender seconds per stage and size (> 1: faster than the baseline)

Small on purpose (100 dpi, few colours): each PNG stays well under 200 KB.
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("build", "verify", "split", "install")
COLOURS = {"build": "#1f77b4", "verify": "#2ca02c", "split": "#d62728", "install": "#9467bd"}


def _gb(n: int) -> float:
    return n / 1e9


def _label(n: int) -> str:
    for unit, f in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n} B"


def _series(doc: dict, stage: str) -> list[tuple[float, dict]]:
    return [(_gb(r["size_bytes"]), r["stages"][stage]) for r in doc["results"] if stage in r["stages"]]


def _subtitle(doc: dict) -> str:
    m = doc["machine"]
    cache = "page cache dropped before each run" if doc["page_cache"]["dropped"] else "page cache not dropped"
    return (f"{m['nproc']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM (dotted line), {cache}, "
            f"load avg at start {m['load_average_at_start'][0]:.1f}, {doc['date']}")


def _ram_line(ax, doc: dict) -> None:
    ram = _gb(doc["machine"]["ram_bytes"])
    if any(_gb(r["size_bytes"]) > ram for r in doc["results"]):
        ax.axvline(ram, color="grey", linestyle=":", linewidth=1)


def plot(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = doc.get("labels", {})
    written = []
    stages = [s for s in STAGES if _series(doc, s)]

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for s in stages:
        pts = _series(doc, s)
        xs = [x for x, _ in pts]
        name, base = labels.get(s, (s, "baseline"))
        ax.plot(xs, [r["contender"]["seconds"] for _, r in pts], "o-", color=COLOURS[s], label=name)
        ax.plot(xs, [r["baseline"]["seconds"] for _, r in pts], "s--", color=COLOURS[s], alpha=0.6,
                label=f"  baseline: {base}")
    _ram_line(ax, doc)
    ax.set(xlabel="model size (GB)", ylabel="seconds (incl. sync)", title="Time vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.text(0.5, 0.005, _subtitle(doc), ha="center", fontsize=7, color="grey")
    written.append(_save(fig, out_dir / "scale-time.png"))

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for s in stages:
        pts = _series(doc, s)
        xs = [x for x, _ in pts]
        name, base = labels.get(s, (s, "baseline"))
        ax.plot(xs, [r["contender"]["peak_rss"] / 2**20 for _, r in pts], "o-", color=COLOURS[s], label=name)
        ax.plot(xs, [r["baseline"]["peak_rss"] / 2**20 for _, r in pts], "s--", color=COLOURS[s], alpha=0.6,
                label=f"  baseline: {base}")
    _ram_line(ax, doc)
    ax.set(xlabel="model size (GB)", ylabel="peak RSS of the process tree (MiB)", title="Peak memory vs model size")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the lines
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.text(0.5, 0.005, _subtitle(doc), ha="center", fontsize=7, color="grey")
    written.append(_save(fig, out_dir / "scale-rss.png"))

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    sizes = [r["size_bytes"] for r in doc["results"]]
    names = {r["size_bytes"]: _label(r.get("asked_bytes", r["size_bytes"])) + (" (probe)" if r.get("probe") else "")
             for r in doc["results"]}
    width = 0.8 / max(1, len(sizes))
    for i, n in enumerate(sizes):
        r = next(r for r in doc["results"] if r["size_bytes"] == n)
        xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(stages))]
        colour = matplotlib.cm.viridis(i / max(1, len(sizes)))
        here = [(x, r["stages"][s]["ratio"]) for x, s in zip(xs, stages, strict=True) if s in r["stages"]]
        bars = ax.bar([x for x, _ in here], [v for _, v in here], width, label=names[n], color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
        for x, s in zip(xs, stages, strict=True):
            if s in r.get("skipped", {}):
                ax.text(x, 0.02, "skipped: disk", rotation=90, fontsize=6, ha="center", va="bottom", color="grey")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(stages)), [f"{labels.get(s, (s, ''))[0]}\nvs {labels.get(s, ('', 'baseline'))[1]}"
                                       for s in stages], fontsize=8)
    ax.set(ylabel="baseline s / contender s  (> 1: faster)", title="Speed relative to the same-run baseline")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="model size", title_fontsize=8)
    fig.text(0.5, 0.005, _subtitle(doc), ha="center", fontsize=7, color="grey")
    written.append(_save(fig, out_dir / "scale-ratio.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
