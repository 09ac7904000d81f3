"""One line per group of a results folder: `python -m fused_resnet.bench.summary OUTDIR` (the GPU check's
closing summary). Best stock baseline vs best fused contender, per-layer geometric means, failures; then the
project's speed and memory targets (issues 4, 5, 6) where the folder holds the rows they compare."""

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
    wrong = sorted({r["contender"] for r in rows if r["status"] == "wrong"})
    if wrong:
        text += f"; WRONG RESULT (off the reference, not timed as a result): {', '.join(wrong)}"
    return f"{group}: {text}"


def headlines(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[f"[{r['profile']}] {r.get('group') or r['model'] + ' ' + r['mode']}"].append(r)
    return [_group_line(group, rs) for group, rs in groups.items()]


# (mode, batch, baseline contender, least ratio fused/baseline): ResNet-50, 224×224, bf16, channels_last.
SPEED_TARGETS = (
    ("inference", 256, "compile_max_autotune", 1.25),
    ("inference", 256, "eager_cl+autocast", 2.0),
    ("inference", 32, "compile_max_autotune", 1.2),
    ("train", 256, "eager+autocast", 1.3),
    ("train", 256, "compile+autocast", 1.1),
)
# Train step at batch 256: the fused peak memory over eager's, at most.
MEMORY_TARGET = ("train", 256, "eager+autocast", 0.75)


def _backend_of(contender: str) -> str | None:
    # "fused:cuda+autocast", "fused:triton+cudagraphs" -> "cuda", "triton"
    return contender[len("fused:") :].split("+")[0] if contender.startswith("fused:") else None


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each target against each fused backend's best variant (plain, CUDA graphs, autocast), where measured."""
    ok = [r for r in rows if r["status"] == "ok" and r["model"] == "resnet50" and r["dtype"] == "bf16"]
    lines = []
    for mode, batch, baseline, least in SPEED_TARGETS:
        group = [r for r in ok if r["mode"] == mode and r["batch"] == batch and r.get("images_per_s")]
        base = _best([r for r in group if r["contender"] == baseline])
        where = f"resnet50 bf16 {mode} b={batch}"
        if base is None:
            lines.append(f"target {where}: fused >= {least}x {baseline}: not measured (no {baseline} row)")
            continue
        for backend in sorted({b for r in group if (b := _backend_of(r["contender"])) and b != "reference"}):
            fused = _best([r for r in group if _backend_of(r["contender"]) == backend])
            ratio = fused["images_per_s"] / base["images_per_s"]
            verdict = "met" if ratio >= least else "MISSED"
            lines.append(
                f"target {where}: {fused['contender']} {fmt(fused['images_per_s'])} img/s = {fmt(ratio)}x "
                f"{baseline} ({fmt(base['images_per_s'])}); target >= {least}x: {verdict}"
            )
    mode, batch, baseline, most = MEMORY_TARGET
    group = [r for r in ok if r["mode"] == mode and r["batch"] == batch and r.get("peak_mem_mb")]
    base = next((r for r in group if r["contender"] == baseline), None)
    fused_rows = [r for r in group if _backend_of(r["contender"]) not in (None, "reference")]
    for fused in sorted(fused_rows, key=lambda r: r["contender"]):
        if base is None:
            break
        ratio = fused["peak_mem_mb"] / base["peak_mem_mb"]
        lines.append(
            f"target resnet50 bf16 {mode} b={batch} peak memory: {fused['contender']} {fmt(fused['peak_mem_mb'])} MB "
            f"= {fmt(ratio)}x {baseline}; target <= {most}x: {'met' if ratio <= most else 'MISSED'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fused_resnet.bench.summary OUTDIR", file=sys.stderr)
        return 2
    rows = load(Path(args[0]))["rows"]
    for line in headlines(rows) + target_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
