"""PNG plots from the result rows: throughput vs batch per model, and speedup over stock per layer type."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

THROUGHPUT_PNG = "throughput.png"
LAYERS_PNG = "layers.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["mode"] == mode and r["status"] == "ok" and r.get("ms_p50")]


def throughput_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """images/s vs batch, one panel per (model, mode), one line per (contender, dtype). False if no data."""
    panels: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for mode in ("inference", "train"):
        for r in _ok(rows, mode):
            panels[(r["model"], mode)][(r["contender"], r["dtype"])].append((r["batch"], r["images_per_s"]))
    if not panels:
        return False
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.5 * nrows), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    # One colour per (contender, dtype) across every panel, so a line means the same thing everywhere.
    labels = sorted({key for lines in panels.values() for key in lines})
    color_of = {key: colors[i % len(colors)] for i, key in enumerate(labels)}
    for ax, ((model, mode), lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        for (contender, dtype), points in sorted(lines.items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", color=color_of[(contender, dtype)], label=f"{contender} {dtype}")
        ax.set(title=f"{model} {mode}", xlabel="batch", ylabel="images/s", xscale="log", yscale="log")
        batches = sorted({p[0] for points in lines.values() for p in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        # Label 1-2-5 steps: a range under a decade would otherwise show no y labels at all on a log axis.
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(rows[0]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def layer_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Geometric-mean speedup over `stock` per layer type, one bar per contender, one panel per layer group."""
    panels: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in _ok(rows, "layer"):
        if r["contender"] != "stock" and r.get("speedup_vs_eager"):
            key = (r["model"], r["batch"], r["dtype"])
            panels[key][r["layer_type"]][r["contender"]].append(r["speedup_vs_eager"])
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4 * len(panels)), squeeze=False)
    for ax, ((model, batch, dtype), types) in zip(axes.flat, sorted(panels.items()), strict=False):
        contenders = sorted({c for by_c in types.values() for c in by_c})
        width = 0.8 / len(contenders)
        for i, contender in enumerate(contenders):
            values = [_geomean(types[t].get(contender, [])) for t in types]
            ax.bar([j + i * width for j in range(len(types))], values, width, label=contender)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], list(types), rotation=20, fontsize=7)
        ax.set(
            title=f"{model} per layer, batch {batch}, {dtype}: speedup over stock conv+BN+add+ReLU", ylabel="× stock"
        )
        ax.legend(fontsize=7)
    fig.suptitle(rows[0]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else 0.0


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Writes the plots that have data; returns their paths (none when matplotlib is missing)."""
    try:
        _pyplot()
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    written = []
    for name, plot in ((THROUGHPUT_PNG, throughput_plot), (LAYERS_PNG, layer_plot)):
        path = Path(out_dir) / name
        if plot(rows, path):
            written.append(path)
    return written
