"""Result files: rows appended to results.csv and results.json, and the markdown report built from the JSON.

Every row carries the conditions it was measured under (device, driver, versions, dtype, batch, memory format,
mode, date). Numbers are only ever copied from measurements; a contender that failed or was skipped has an
empty measurement and its reason in `error`.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"

ENV_FIELDS = ["date", "device", "driver", "torch", "torchvision", "triton", "cuda", "cudnn", "python", "git_commit"]
ROW_FIELDS = [
    *ENV_FIELDS,
    "profile",
    "group",  # the (model, batch, dtype, mode) group a row was measured in, beside the same contenders
    "model",
    "mode",  # inference | train | layer | max-batch
    "layer",
    "layer_type",
    "contender",
    "backend",
    "dtype",
    "autocast",
    "memory_format",
    "batch",
    "image_size",
    "status",  # ok | failed | skipped | wrong (a fused result off the reference: bench/parity.py)
    "error",
    "images_per_s",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "ms_p90",
    "samples",
    "first_call_s",
    "peak_mem_mb",
    "host_ms_p50",  # GPU: the host's time to enqueue one call (timing.py)
    "cuda_mallocs",  # GPU: the caching allocator's cudaMalloc calls during the timed samples
    "alloc_retries",  # GPU: its out-of-memory retries then (each frees cached blocks and waits for the device)
    "gflop_per_call",
    "tflops",
    "ceiling_ms",
    "pct_ceiling",
    "speedup_vs_eager",
    "rel_err",
    "max_abs_err",
    "notes",
]


def load(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_JSON
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "rows": [], "roofline": [], "done": []}


def clear(out_dir: Path) -> bool:
    """Removes an earlier run's result files (rows, report, plots) from out_dir; whether there were any."""
    out_dir = Path(out_dir)
    names = (RESULTS_CSV, RESULTS_JSON, REPORT_MD, "throughput.png", "layers.png")  # the plots: bench/plots.py
    files = [out_dir / name for name in names]
    found = [f for f in files if f.exists()]
    for f in found:
        f.unlink()
    return bool(found)


def drop_rows(out_dir: Path, keys: set[tuple], key_of: Any) -> None:
    """Removes the rows whose key_of(row) is in keys (groups a --resume run is about to run again) from the JSON."""
    data = load(out_dir)
    kept = [r for r in data["rows"] if key_of(r) not in keys]
    if len(kept) != len(data["rows"]):
        data["rows"] = kept
        _write(out_dir, data)
        with (Path(out_dir) / RESULTS_CSV).open("w", newline="") as f:  # the CSV holds the same rows
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for row in kept:
                writer.writerow({k: _csv_value(row.get(k)) for k in ROW_FIELDS})


def append(
    out_dir: Path,
    rows: list[dict[str, Any]],
    roofline: list[dict[str, Any]] = (),
    run: dict[str, Any] | None = None,
    done: list[list] = (),
) -> None:
    """Appends rows to results.csv and results.json; a run record, roofline entries and the keys of finished
    groups (for --resume) go to the JSON only."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = {key for row in rows for key in row} - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"rows carry fields not in ROW_FIELDS: {sorted(unknown)}")
    csv_path = out_dir / RESULTS_CSV
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in ROW_FIELDS})
    data = load(out_dir)
    if run is not None:
        data["runs"].append(run)
    data["rows"].extend(rows)
    data["roofline"].extend(roofline)
    data.setdefault("done", []).extend(done)
    _write(out_dir, data)


def finish_run(out_dir: Path, **fields: Any) -> None:
    """Adds fields (wall time, what was left undone) to the latest run record."""
    data = load(out_dir)
    data["runs"][-1].update(fields)
    _write(out_dir, data)


def _write(out_dir: Path, data: dict[str, Any]) -> None:
    # One row per line, empty fields left out: readable in a diff, and a full GPU profile stays near 1 MB.
    head = {k: v for k, v in data.items() if k != "rows"}
    rows = [json.dumps({k: _json_value(v) for k, v in row.items() if v not in (None, "")}) for row in data["rows"]]
    text = json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + ",\n".join(rows) + "\n ]\n}\n"
    (Path(out_dir) / RESULTS_JSON).write_text(text)


def _json_value(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def fmt(value: Any, digits: int = 3) -> str:
    """A number with `digits` significant digits (integers above that stay whole), or '' for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10 ** (digits - 1):
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _model_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "contender",
        "dtype",
        "fmt",
        "batch",
        "img/s",
        "ms p50 [p20-p80]",
        "ms p90",
        "host ms",
        "× eager",
        "peak MB",
        "TFLOP/s",
        "% ceiling",
        "rel err",
        "max abs",
        "1st call s",
        "status / note",
    ]
    body = []
    for r in rows:
        ms = f"{fmt(r.get('ms_p50'))} [{fmt(r.get('ms_p20'))}-{fmt(r.get('ms_p80'))}]" if r.get("ms_p50") else ""
        status = r["status"] if r["status"] != "ok" else ""
        note = "; ".join(x for x in (status, r.get("error") or "", _allocator_note(r), r.get("notes") or "") if x)
        body.append(
            [
                r["contender"],
                r.get("dtype", ""),
                r.get("memory_format", ""),
                str(r.get("batch", "")),
                fmt(r.get("images_per_s")),
                ms,
                fmt(r.get("ms_p90")),
                fmt(r.get("host_ms_p50")),
                fmt(r.get("speedup_vs_eager")),
                fmt(r.get("peak_mem_mb")),
                fmt(r.get("tflops")),
                _pct(r.get("pct_ceiling")),
                fmt(r.get("rel_err"), 2),
                fmt(r.get("max_abs_err"), 2),
                fmt(r.get("first_call_s")),
                note,
            ]
        )
    return _table(header, body)


def _allocator_note(row: dict[str, Any]) -> str:
    """What the caching allocator did during the timed samples, where it did anything."""
    mallocs, retries = row.get("cuda_mallocs") or 0, row.get("alloc_retries") or 0
    if not (mallocs or retries):
        return ""
    return f"{mallocs} cudaMalloc, {retries} allocator retries while timed"


def _layer_table(rows: list[dict[str, Any]]) -> str:
    # A layer the time budget left out has one row, contender "-" (layers.py): its status fills the first column.
    contenders = list(dict.fromkeys(r["contender"] for r in rows if r["contender"] != "-"))
    by_layer: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_layer[r["layer"]][r["contender"]] = r
    header = ["layer (first of its shape)", "type", *[f"{c} µs (× stock)" for c in contenders], "best % ceiling"]
    body = []
    for layer, cells in by_layer.items():
        first = next(iter(cells.values()))
        line = [layer, first.get("layer_type") or ""]
        if "-" in cells and len(cells) == 1:
            body.append(line + [f"{first['status']}: {first.get('error') or ''}"] + [""] * len(contenders))
            continue
        for c in contenders:
            r = cells.get(c)
            if r is None or r["status"] != "ok":
                line.append(r["status"] if r else "")
            else:
                line.append(f"{fmt(r['ms_p50'] * 1e3)} ({fmt(r.get('speedup_vs_eager'))})")
        pcts = [r["pct_ceiling"] for r in cells.values() if r.get("pct_ceiling") is not None]
        line.append(_pct(max(pcts)) if pcts else "")
        body.append(line)
    return _table(header, body)


def _roofline_table(entries: list[dict[str, Any]]) -> str:
    header = [
        "model",
        "batch",
        "dtype",
        "peaks",
        "compute only",
        "fused",
        "compile-like",
        "eager-like",
        "train (fused)",
    ]
    body = [
        [
            e["model"],
            str(e["batch"]),
            e["dtype"],
            e["peaks"],
            *[fmt(e[k]) for k in ("compute", "fused", "compile", "eager", "train")],
        ]
        for e in entries
    ]
    return _table(header, body)


LEGEND = (
    "img/s = batch / median step time; latency = per-call ms (p50 [p20-p80], p90); × eager = throughput over the "
    "plain `eager` row (NCHW) of the same batch and dtype; % ceiling = achieved / per-layer roofline ceiling (fused "
    "structure for inference, fused training for train; see roofline below); rel err = ‖y − y_ref‖/‖y_ref‖ of the "
    "logits against fp32 eager NCHW (TF32 off) on the same input; host ms = the host's time to enqueue one call "
    "(GPU only; well below ms p50, the GPU set the pace); cudaMalloc calls and allocator retries (a retry frees cached "
    "blocks and waits for the device) during the timed samples are noted where there were any; "
    "peak MB = torch.cuda.max_memory_allocated over "
    "build, first call and warm-up, above what was allocated before (GPU only; empty on CPU); 1st call s includes "
    "compilation and autotuning; status wrong = a fused result off the reference by more than its dtype's tolerance "
    "and 4× the stock contenders' own error (its speed is no result). Per-layer rows time kernels on a GPU (the host's "
    "launches hidden); on a CPU they include each call's host time. Timings compare only within one run."
)


def _busy_note(run: dict[str, Any], env: dict[str, Any]) -> str:
    # Other jobs that start during a run skew it (an audit saw a train step at 11x its quiet time, unflagged).
    peak = run.get("max_load")
    if peak is None:
        return ""
    cores = int(env.get("cpu_count") or 1)
    note = f", up to {peak:.1f} during the run"
    if cores > 1 and peak > cores - 0.5:
        note += f" (**the machine was busy: {cores} cores; other jobs skew these timings**)"
    return note


def _arguments(run: dict[str, Any]) -> str:
    # The command line's choices, as given (the profile's note describes the profile's defaults).
    given = {k: v for k, v in run.get("args", {}).items() if v not in ("None", "False", "") and k not in ("out",)}
    return f" with {', '.join(f'{k}={v}' for k, v in given.items())}" if given else ""


def markdown(data: dict[str, Any]) -> str:
    """The report: runs, then one table per (device, model, mode), per-layer tables, roofline ceilings."""
    parts = ["# fused_resnet benchmark", ""]
    for run in data["runs"]:
        env = run["env"]
        cuda = f"CUDA {env['cuda']}, cuDNN {env['cudnn']}"
        if env["device"].startswith("CPU"):
            cuda = f"torch built for {cuda} (unused here)"
        parts.append(
            f"- {env['date']} **{env['device']}**, driver {env['driver']}, torch {env['torch']}, triton "
            f"{env['triton']}, {cuda}, commit {env['git_commit']}, load average "
            f"{env.get('load_avg', '?')} at start{_busy_note(run, env)}; profile "
            f"`{run['profile']}`{_arguments(run)}; {run.get('wall_s', '?')} s. {run.get('note', '')}"
        )
    parts += ["", LEGEND]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        per_layer = r["mode"] == "layer"
        key = (r["device"], r["profile"], r["model"], r["mode"], r.get("batch") if per_layer else None, r["dtype"])
        groups[key if per_layer else key[:-1]].append(r)
    for key, rows in groups.items():
        device, profile, model, mode, batch = key[:5]
        if mode == "layer":
            title = f"{model} per layer, batch {batch}, {key[5]}"
            parts += ["", f"## {title} ({device}, profile {profile})", "", _layer_table(rows)]
        else:
            parts += ["", f"## {model} {mode} ({device}, profile {profile})", "", _model_table(rows)]
    roofline = list({(e["model"], e["batch"], e["dtype"], e["peaks"]): e for e in data["roofline"]}.values())
    if roofline:
        parts += [
            "",
            "## Roofline ceilings, images/s (estimates from per-layer FLOPs and bytes, not measurements)",
            "",
            _roofline_table(roofline),
        ]
    return "\n".join(parts) + "\n"


def write_markdown(out_dir: Path) -> str:
    text = markdown(load(out_dir))
    (Path(out_dir) / REPORT_MD).write_text(text)
    return text
