"""Whether a benchmark row's result is right: a fused contender whose output is off the fp32 reference by more than
its dtype's tolerance, and than STOCK_FACTOR times the stock contenders' own error in that dtype (the measure of
what the problem's conditioning allows), is marked "wrong": a speed of a wrong result is no result. Before this, the
error was recorded beside each row but judged nowhere (found by audit: a kernel made to add 1e-3 to every output
kept status ok, and its speed-up stood in the report)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..tolerances import STOCK_FACTOR, forward_rtol

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def judge(rows: Iterable[dict[str, Any]], device: torch.device) -> None:
    """Marks the fused rows of one group (or one layer shape) whose error is past the bound (see the module doc)."""
    rows = list(rows)
    stock: dict[str, float] = {}
    for r in rows:
        if not r["contender"].startswith("fused:") and r["status"] == "ok" and r.get("rel_err") is not None:
            stock[r["dtype"]] = max(stock.get(r["dtype"], 0.0), r["rel_err"])
    for r in rows:
        if not r["contender"].startswith("fused:") or r["status"] != "ok" or r.get("rel_err") is None:
            continue
        bound = max(forward_rtol(_DTYPES[r["dtype"]], device), STOCK_FACTOR * stock.get(r["dtype"], 0.0))
        if not r["rel_err"] <= bound:  # NaN too
            r.update(
                status="wrong",
                error=f"output off the fp32 reference by {r['rel_err']:.3g} (relative), past the bound {bound:.3g} "
                f"({r['dtype']}'s tolerance, or {STOCK_FACTOR:g}× the stock contenders' own error)",
            )
