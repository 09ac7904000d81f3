"""One line per group of a results folder: `python -m fused_resnet.bench.summary OUTDIR` (the GPU check's
closing summary). Best stock baseline vs best fused contender, per-layer geometric means, failures."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import fmt, load


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def _group_line(group: str, rows: list[dict[str, Any]]) -> str:
    timed = [r for r in rows if r["status"] == "ok" and r.get("ms_p50")]
    mode = rows[0]["mode"]
    if mode == "layer":
        by_contender: dict[str, list[float]] = defaultdict(list)
        for r in timed:
            if r.get("speedup_vs_eager"):
                by_contender[r["contender"]].append(r["speedup_vs_eager"])
        parts = [f"{c} {fmt(_geomean(v))}×" for c, v in by_contender.items() if c != "stock"]
        text = "geomean over shapes vs stock conv+BN+add+ReLU: " + ", ".join(parts)
    elif mode == "max-batch":
        text = "largest batch: " + (", ".join(f"{r['contender']} {r['batch']}" for r in timed) or "none measured")
    else:
        fused = _best([r for r in timed if r["contender"].startswith("fused:")])
        stock_rows = [r for r in timed if not r["contender"].startswith("fused:")]
        # Compare like with like: the best stock contender that computes in the fused winner's dtype.
        stock = _best([r for r in stock_rows if fused is None or r["dtype"] == fused["dtype"]])
        parts = []
        if stock is not None:
            parts.append(f"best stock {stock['contender']} ({stock['dtype']}) {fmt(stock['images_per_s'])} img/s")
        if fused is not None:
            ratio = f" = {fmt(fused['images_per_s'] / stock['images_per_s'])}× that" if stock else ""
            parts.append(
                f"best fused {fused['contender']} ({fused['dtype']}) {fmt(fused['images_per_s'])} img/s{ratio}"
            )
        text = "; ".join(parts) or "nothing timed"
    skipped = sum(r["status"] == "skipped" for r in rows)
    if skipped:
        text += f"; {skipped} skipped"
    failed = sorted({r["contender"] for r in rows if r["status"] == "failed"})
    if failed:
        text += f"; FAILED: {', '.join(failed)}"
    return f"{group}: {text}"


def headlines(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[f"[{r['profile']}] {r.get('group') or r['model'] + ' ' + r['mode']}"].append(r)
    return [_group_line(group, rs) for group, rs in groups.items()]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fused_resnet.bench.summary OUTDIR", file=sys.stderr)
        return 2
    for line in headlines(load(Path(args[0]))["rows"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
