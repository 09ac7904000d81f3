"""Per-layer rows: every unique conv (+ BN + [add] + [ReLU]) shape of a model, timed as

- `conv`: the stock convolution alone (cuDNN on a GPU, oneDNN on a CPU), no epilogue;
- `stock`: the stock convolution followed by the stock kernels a fused op replaces (BN, add, ReLU), as eager
  torchvision runs them;
- `fused:<backend>`: fused_resnet's conv_bn_act on each backend that runs on the device.

On a GPU each sample is the GPU time of one call (timing.time_block's hide_launch): these rows compare kernels;
the host's launch overhead shows in the model rows. (Results before 2026-11-26's third H200 run held it here too.)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..nn.functional import conv_bn_act
from ..tolerances import max_abs_error, relative_error
from . import parity, roofline
from .contenders import DEVICE_BACKENDS, engine_scope, engine_unfit, hopper_engine_runs, other_cuda_engines
from .profiles import Profile, dtype_name
from .progress import Progress
from .runner import OUT_OF_TIME, free_memory, layers_of, one_line, rounds_for, strict_fp32, timing_fields
from .timing import l2_flusher, time_interleaved, warm_up


@dataclass(frozen=True)
class LayerCase:
    layer: roofline.Layer  # the first layer of the model with this shape and epilogue
    count: int  # how many layers of the model share it

    @property
    def label(self) -> str:
        cin, cout, kh, kw, stride, pad, h, w, groups = self.layer.geometry
        return f"{self.layer.name} ({cin}→{cout}, {h}×{w})"


def layer_type(layer: roofline.Layer) -> str:
    """'3x3/1', '1x1/2 shortcut', '7x7/2 stem', with '+add' where the residual add is in the epilogue."""
    cin, _, kh, kw, stride, *_ = layer.geometry
    label = f"{kh}x{kw}/{stride}"
    if cin == 3:
        label += " stem"
    elif not layer.relu and not layer.residual:
        label += " shortcut"
    return label + (" +add" if layer.residual else "")


def unique_conv_layers(layers: list[roofline.Layer]) -> list[LayerCase]:
    """The conv layers grouped by geometry and epilogue, in order of first appearance."""
    cases: dict[tuple, list[roofline.Layer]] = {}
    for layer in layers:
        if layer.kind == "conv":
            cases.setdefault((layer.geometry, layer.bn, layer.residual, layer.relu), []).append(layer)
    return [LayerCase(same[0], len(same)) for same in cases.values()]


def _modules(layer: roofline.Layer, device: torch.device, dtype: torch.dtype) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    cin, cout, kh, kw, stride, pad, _, _, groups = layer.geometry
    conv = nn.Conv2d(cin, cout, (kh, kw), stride, pad, groups=groups, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return conv.to(device, dtype).eval(), bn.to(device, dtype).eval()


def _stock(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual: torch.Tensor | None) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        y = bn(conv(x))
        if residual is not None:
            y += residual
        return F.relu(y, inplace=True) if relu else y

    return run


def _functions(
    case: LayerCase, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: torch.Tensor | None, device: torch.device
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    layer = case.layer
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "conv": conv,
        "stock": _stock(conv, bn, layer.relu, residual),
    }
    for name in DEVICE_BACKENDS[device.type]:
        if backends.unavailable_reason(name) is None:
            fns[f"fused:{name}"] = lambda x, name=name: conv_bn_act(x, conv, bn, residual, layer.relu, backend=name)
    if "fused:cuda" in fns and hopper_engine_runs(device):
        # fused:cuda runs the engine in use (by default CUTLASS's sm90 convs here); the others beside it.
        for engine in other_cuda_engines():
            if engine_unfit(engine):  # the model rows say why
                continue

            def on_engine(x: torch.Tensor, engine: str = engine) -> torch.Tensor:
                with engine_scope(engine):
                    return conv_bn_act(x, conv, bn, residual, layer.relu, backend="cuda")

            fns[f"fused:cuda+{engine}"] = on_engine
    return fns


def run_layers(
    model_name: str,
    batch: int,
    dtype: torch.dtype,
    profile: Profile,
    device: torch.device,
    peaks: roofline.DevicePeaks | None,
    base: Callable[[dict[str, Any]], dict[str, Any]],
    progress: Progress,
    deadline: float = float("inf"),
) -> list[dict[str, Any]]:
    """Rows (mode "layer") for every unique conv layer of a model at one batch size and dtype (layers not
    started by the deadline: one skipped row each, with OUT_OF_TIME)."""
    rows = []
    flush = l2_flusher(device)
    element_size = torch.empty((), dtype=dtype).element_size()
    group_name = f"{model_name} b={batch} {dtype_name(dtype)} layer"
    cases = unique_conv_layers(list(layers_of(model_name, batch, profile.image_size)))
    for case in cases[: profile.max_layer_shapes]:
        if time.monotonic() > deadline:
            rows.append(
                base(
                    {
                        "group": group_name,
                        "model": model_name,
                        "mode": "layer",
                        "layer": case.label,
                        "contender": "-",
                        "layer_type": layer_type(case.layer),
                        "dtype": dtype_name(dtype),
                        "batch": batch,
                        "status": "skipped",
                        "error": OUT_OF_TIME,
                    }
                )
            )
            continue
        progress.note(f"{model_name} b={batch} {dtype_name(dtype)} layer {case.label}")
        layer = case.layer
        torch.manual_seed(0)
        conv, bn = _modules(layer, device, torch.float32)
        cin, cout, _, _, _, _, h, w, _ = layer.geometry
        x32 = torch.randn(batch, cin, h, w, device=device)
        res32 = None
        if layer.residual:
            res32 = torch.randn(batch, cout, *layer.output_hw, device=device)
        with torch.no_grad(), strict_fp32():
            references = {"conv": conv(x32).double(), "stock": _stock(conv, bn, layer.relu, res32)(x32).double()}
        conv, bn = conv.to(dtype, memory_format=torch.channels_last), bn.to(dtype)
        x = x32.to(dtype).contiguous(memory_format=torch.channels_last)
        residual = None if res32 is None else res32.to(dtype).contiguous(memory_format=torch.channels_last)
        ceiling_ms = None
        if peaks is not None:
            ceiling_ms = roofline.ceiling_seconds([layer], peaks, dtype, device.type, "fused") * 1e3
        fused_gb = roofline.layer_bytes(layer, "fused", element_size) / 1e9
        steps, case_rows, best = {}, {}, {}
        for name, fn in _functions(case, conv, bn, residual, device).items():
            row = base(
                {
                    "group": group_name,
                    "model": model_name,
                    "mode": "layer",
                    "layer": case.label,
                    "layer_type": layer_type(layer),
                    "contender": name,
                    "backend": name.removeprefix("fused:") if name.startswith("fused:") else "",
                    "dtype": dtype_name(dtype),
                    "autocast": False,
                    "memory_format": "channels_last",
                    "batch": batch,
                    "image_size": profile.image_size,
                    "gflop_per_call": layer.flops / 1e9,
                    "ceiling_ms": ceiling_ms,
                    "notes": f"{case.count} layer(s) of this shape; fused structure moves {fused_gb:.3g} GB",
                }
            )
            case_rows[name] = row
            try:
                with torch.no_grad():
                    out = fn(x).double()
                    reference = references["conv" if name == "conv" else "stock"]
                    row["rel_err"], row["max_abs_err"] = relative_error(out, reference), max_abs_error(out, reference)
                    step = functools.partial(fn, x)
                    best[name] = warm_up(step, device, profile.seconds_per_layer / 10)
                steps[name] = step
                row["status"] = "ok"
            except Exception as err:  # reported, the run goes on
                row.update(status="failed", error=one_line(err))
        with torch.no_grad():
            rounds = rounds_for(profile, sum(best.values()), profile.seconds_per_layer)
            # GPU time alone: these rows compare kernels (a model's host overhead shows in its own rows).
            timings = time_interleaved(
                steps,
                device,
                rounds,
                flush=flush,
                budget_s=profile.seconds_per_layer,
                min_rounds=profile.min_rounds,
                hide_launch=True,
            )
        for name, t in timings.items():
            row = case_rows[name]
            row.update({k: v for k, v in timing_fields(t, batch).items() if k != "images_per_s"})
            row["tflops"] = layer.flops / 1e9 / t.median
            if ceiling_ms is not None:
                row["pct_ceiling"] = ceiling_ms / t.median
            if "stock" in timings:
                row["speedup_vs_eager"] = timings["stock"].median / t.median
        parity.judge(case_rows.values(), device)
        rows += case_rows.values()
        free_memory(device)
    return rows
