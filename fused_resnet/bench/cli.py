"""`python -m fused_resnet.bench`: the benchmark + parity report.

Writes into --out (at most five files): results.csv and results.json (rows appended, so runs and resumed runs
accumulate), report.md (regenerated from results.json and printed at the end), throughput.png and layers.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..models import TORCHVISION_BUILDERS
from . import report
from .contenders import plan as plan_contenders
from .env_info import environment
from .layers import run_layers
from .maxbatch import run_max_batch
from .plots import write_plots
from .profiles import DTYPES, MODES, PROFILES, Profile, default_profile_name, dtype_name
from .progress import Progress
from .roofline import DevicePeaks, datasheet_peaks, measure_peaks
from .runner import OUT_OF_TIME, roofline_entry, run_group


def _split(values: list[str] | None) -> list[str] | None:
    """Accepts both `--models a b` and `--models a,b`."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fused_resnet.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="what to run (default: gpu-quick with a GPU, cpu without)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: ./bench-out)")
    p.add_argument("--models", nargs="+", help="torchvision ResNet names, e.g. resnet18 resnet50")
    p.add_argument("--batch", nargs="+", help="batch sizes, e.g. 1 32 256")
    p.add_argument("--dtypes", nargs="+", help="bf16, fp16, fp32")
    p.add_argument("--mode", choices=("inference", "train", "both"), help="model-level modes")
    p.add_argument(
        "--compile",
        choices=("profile", "all", "none"),
        default="profile",
        help="which groups get the torch.compile contenders (default: as the profile says)",
    )
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer rows")
    p.add_argument("--layers-only", action="store_true", help="only the per-layer rows")
    p.add_argument(
        "--max-batch-search",
        action="store_true",
        help="also find the largest training batch that fits (GPU; ResNet-152 and a pre-act CIFAR net)",
    )
    p.add_argument(
        "--measure-peak",
        action="store_true",
        help="measure matmul TFLOP/s and copy bandwidth here instead of using datasheet peaks",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new contender after this many minutes (default: the profile's budget, if any; 0: none). "
        "Unfinished groups are reported and left for --resume",
    )
    p.add_argument("--resume", action="store_true", help="skip groups already in --out/results.json")
    p.add_argument(
        "--graph-replays",
        action="store_true",
        help="GPU: also time each eager contender (inference, or a whole train step) captured in a CUDA graph and "
        "replayed (its GPU time without host launch overhead). Off by default: one such run ended in an illegal "
        "memory access, cause not yet found",
    )
    p.add_argument(
        "--contenders",
        nargs="+",
        metavar="NAME",
        help="only these contenders (by their row names, e.g. eager_cl+autocast fused:cuda compile_max_autotune) and "
        "plain eager in every group: a slow compile measured beside its baselines without building the rest",
    )
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="GPU: also torch.compile(mode='max-autotune') wherever the compile contenders run (the issues' inference "
        "baseline; its compile takes minutes per model and batch)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch. Default: torch's choice, except 1 when the machine is busy (load average "
        "above cores - 0.5), where 2-thread OpenMP runs stall for tens of ms whenever a thread is descheduled",
    )
    return p.parse_args(argv)


def _batches(values: list[str] | None) -> tuple[int, ...]:
    batches = []
    for value in _split(values) or ():
        try:
            batch = int(value)
        except ValueError:
            raise SystemExit(f"--batch takes positive integers, got {value!r}") from None
        if batch < 1:
            raise SystemExit(f"--batch takes positive integers, got {batch}")
        batches.append(batch)
    return tuple(batches)


def make_profile(args: argparse.Namespace) -> Profile:
    """The named profile with the command line's overrides applied."""
    profile = PROFILES[args.profile or default_profile_name()]
    models = _split(args.models)
    dtypes = _split(args.dtypes)
    for name in dtypes or ():
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
    for name in models or ():
        if name not in TORCHVISION_BUILDERS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(TORCHVISION_BUILDERS)}")
    batches = _batches(args.batch)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    layers = () if args.no_layers else profile.layers
    if models:
        layers = tuple(entry for entry in layers if entry[0] in models)
    if batches:  # every group at the given batches: inference, train and the per-layer rows
        layers = tuple(dict.fromkeys((model, batch) for model, _ in layers for batch in batches))
    if args.layers_only and not layers:
        raise SystemExit(f"--layers-only: profile {profile.name!r} has no per-layer rows for these models")
    modes = MODES if args.mode == "both" else (args.mode,) if args.mode else profile.modes
    return replace(
        profile,
        models=tuple(models) if models else profile.models,
        batches=batches or profile.batches,
        train_batches=batches or profile.train_batches,
        dtypes=tuple(DTYPES[d] for d in dtypes) if dtypes else profile.dtypes,
        modes=() if args.layers_only else modes,
        layers=layers,
        compile_where={"profile": profile.compile_where, "all": None, "none": ()}[args.compile],
        graph_replays=args.graph_replays,
        max_autotune=args.max_autotune or profile.max_autotune,
        only_contenders=tuple(_split(args.contenders) or ()),
    )


def pick_device(profile: Profile) -> torch.device:
    if profile.device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"profile {profile.name!r} needs a CUDA GPU and none is visible; use --profile cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_peaks(device: torch.device, profile: Profile, measure: bool) -> DevicePeaks | None:
    if measure:
        print(f"measuring peak matmul throughput and copy bandwidth on {device} ...", file=sys.stderr)
        peaks = measure_peaks(device, profile.dtypes)
        print(f"measured: {peaks}", file=sys.stderr)
        return peaks
    if device.type != "cuda":
        return None  # no datasheet for CPUs: ceilings only with --measure-peak
    peaks = datasheet_peaks(torch.cuda.get_device_name(device))
    if peaks is None:
        print("this GPU is not in the datasheet table: no ceilings (use --measure-peak)", file=sys.stderr)
    return peaks


def _group_name(model: str, batch: int, dtype: str, mode: str) -> str:
    # A row's "group" for the group of this key (str(Group); the per-layer rows' name in layers.py).
    return f"{model} b={batch} {dtype} {mode}"


def _group_key(env: dict[str, str], profile: Profile, key: tuple) -> list:
    return [env["device"], profile.name, *key]


def cpu_threads(requested: int | None) -> int:
    """The thread count for a CPU run: as requested, else 1 on a busy machine, else torch's default."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if cores > 1 and load > cores - 0.5:
        print(
            f"load average {load:.1f} on {cores} cores: other jobs are running, so this run uses 1 thread "
            "(multi-thread timings would stall on descheduled threads). --threads N overrides. Compare ratios "
            "within this run only.",
            file=sys.stderr,
        )
        return 1
    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = make_profile(args)
    device = pick_device(profile)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    try:
        return _run(args, profile, device)
    finally:
        torch.set_num_threads(threads)


def _warn_unplanned(profile: Profile, device: torch.device) -> None:
    """Names --contenders asked for that no group of this run has here (a typo, or a contender this device lacks)."""
    if not profile.only_contenders:
        return
    every = replace(profile, only_contenders=())
    planned = {c.name for group in every.groups() for c in plan_contenders(group, every, device)}
    missing = [name for name in profile.only_contenders if name not in planned]
    if missing:
        print(
            f"--contenders: no group of this run has {', '.join(missing)} here; known: {', '.join(sorted(planned))}",
            file=sys.stderr,
        )


def _run(args: argparse.Namespace, profile: Profile, device: torch.device) -> int:
    torch.backends.cudnn.benchmark = True
    start = time.monotonic()
    minutes = profile.max_minutes if args.max_minutes is None else args.max_minutes
    deadline = start + minutes * 60 if minutes else float("inf")
    env = environment(device)
    peaks = pick_peaks(device, profile, args.measure_peak)
    done = {tuple(k) for k in report.load(args.out).get("done", [])} if args.resume else set()
    if not args.resume and report.clear(args.out):
        # One table per run: rows of two runs side by side would read as one (found by audit).
        print(f"replacing the results of an earlier run in {args.out} (--resume adds to them)", file=sys.stderr)
    _warn_unplanned(profile, device)

    def base(fields: dict[str, Any]) -> dict[str, Any]:
        return {**{k: env[k] for k in report.ENV_FIELDS}, "profile": profile.name, "status": "", **fields}

    groups = [(g, _group_key(env, profile, g.key())) for g in profile.groups()]
    layer_groups = [
        ((model, batch, dtype), _group_key(env, profile, (model, batch, dtype_name(dtype), "layer")))
        for model, batch in profile.layers
        for dtype in profile.dtypes
    ]
    todo = [g for g in groups if tuple(g[1]) not in done]
    todo_layers = [g for g in layer_groups if tuple(g[1]) not in done]
    if args.resume:  # a group cut short by the time budget runs again whole: its earlier rows go
        again = {(key[0], key[1], _group_name(*key[2:])) for _, key in todo + todo_layers}
        report.drop_rows(args.out, again, lambda r: (r["device"], r["profile"], r["group"]))
    skipped = len(groups) + len(layer_groups) - len(todo) - len(todo_layers)
    if skipped:
        print(f"--resume: {skipped} group(s) already in {args.out / report.RESULTS_JSON}", file=sys.stderr)
    run = {
        "env": env,
        "profile": profile.name,
        "args": {k: str(v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "note": profile.note,
    }
    report.append(args.out, [], run=run)
    progress = Progress(len(todo) + len(todo_layers) + int(args.max_batch_search), desc=profile.name)
    roofline_done: set[tuple] = set()
    remaining: list[str] = []
    max_load = os.getloadavg()[0]
    for group, key in todo:
        max_load = max(max_load, os.getloadavg()[0])
        if time.monotonic() > deadline:
            remaining.append(str(group))
            continue
        rows = run_group(group, profile, device, peaks, base, progress, deadline)
        roof = []
        if peaks is not None and (group.model, group.batch, group.dtype) not in roofline_done:
            roofline_done.add((group.model, group.batch, group.dtype))
            roof.append(roofline_entry(group, profile, device, peaks))
        complete = not any(r["error"] == OUT_OF_TIME for r in rows if r["status"] == "skipped")
        report.append(args.out, rows, roof, done=[key] if complete else [])
        report.write_markdown(args.out)  # kept current, in case a time limit kills the run
        if not complete:
            remaining.append(f"{group} (partly)")
        progress.advance()
    for (model, batch, dtype), key in todo_layers:
        max_load = max(max_load, os.getloadavg()[0])
        if time.monotonic() > deadline:
            remaining.append(f"{model} b={batch} {dtype_name(dtype)} per-layer")
            continue
        rows = run_layers(model, batch, dtype, profile, device, peaks, base, progress, deadline)
        complete = not any(r["error"] == OUT_OF_TIME for r in rows if r["status"] == "skipped")
        report.append(args.out, rows, done=[key] if complete else [])
        report.write_markdown(args.out)
        if not complete:
            remaining.append(f"{model} b={batch} {dtype_name(dtype)} per-layer (partly)")
        progress.advance()
    if args.max_batch_search:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        report.append(args.out, run_max_batch(device, dtype, base, progress, deadline))
        progress.advance()
    progress.close()
    wall = time.monotonic() - start
    max_load = max(max_load, os.getloadavg()[0])
    report.finish_run(args.out, wall_s=round(wall, 1), remaining=remaining, max_load=round(max_load, 2))
    text = report.write_markdown(args.out)
    plots = write_plots(report.load(args.out)["rows"], args.out)
    print(text)
    if remaining:
        print(
            f"time budget ({minutes} minutes) reached; not run: {', '.join(remaining)}. "
            "Run the same command with --resume to continue."
        )
    files = [report.RESULTS_CSV, report.RESULTS_JSON, report.REPORT_MD, *(p.name for p in plots)]
    print(f"wrote {', '.join(str(args.out / f) for f in files)} in {wall:.0f} s")
    return 0
