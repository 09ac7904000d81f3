"""The contenders of a model-level group (anchors.md, "Baselines every benchmark run measures beside us") and how
each one is built into a zero-argument step: one forward (inference) or one training step (forward + backward +
SGD step), returning the logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from .env_info import cpu_has_native_bf16
from .profiles import Group, Profile

Step = Callable[[], torch.Tensor]

# Which fused backends run tensors of each device type; "triton" on a CPU would only be the interpreter.
DEVICE_BACKENDS = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "eager", "folded", "compile", "fused"
    memory_format: torch.memory_format
    dtype: torch.dtype  # the parameters' dtype
    autocast: torch.dtype | None = None
    # "default", "freezing", "max-autotune", "reduce-overhead" (torch.compile), or "graph": the eager step captured
    # once in a CUDA graph and replayed (its GPU time without host launch overhead; no compiler involved)
    compile_mode: str | None = None
    backend: str | None = None
    skip: str | None = None  # why it does not run here (reported as a skipped row)
    note: str = ""
    # The "cuda" backend's engine (fused_resnet.ops.cpp_backend.CUDA_ENGINES) for this contender's steps.
    cuda_engine: str | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast or self.dtype


_TRAIN_NOTES = {
    "reference": "train: stock ops",
    "triton": "train: stock conv + Triton BN passes",
    "cpu": "train: stock conv + C++ BN passes",
    "cuda": "train: stock conv + CUDA BN passes (the extension's)",
}


def plan(group: Group, profile: Profile, device: torch.device) -> list[Contender]:
    """The contenders of one group, baselines first, torch.compile ones last (they cost the most to build)."""
    cl, nchw = torch.channels_last, torch.contiguous_format
    half = group.dtype in (torch.bfloat16, torch.float16)
    train = group.mode == "train"
    # Training in bf16/fp16 means fp32 master weights under autocast (the AMP recipe) for every contender.
    weights, amp = (torch.float32, group.dtype) if (train and half) else (group.dtype, None)
    suffix = "+autocast" if amp else ""
    autocast_dtype = group.dtype if half else torch.bfloat16
    autocast_skip = None
    if device.type == "cpu" and not cpu_has_native_bf16():
        autocast_skip = "this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast would be emulated"

    out = [
        Contender("eager" + suffix, "eager", nchw, weights, amp),
        Contender("eager_cl" + suffix, "eager", cl, weights, amp),
    ]
    if not amp:
        out.append(Contender("eager_cl+autocast", "eager", cl, torch.float32, autocast_dtype, skip=autocast_skip))
    if not train:
        out.append(Contender("bn_folded_cl", "folded", cl, weights))
    for name in DEVICE_BACKENDS[device.type]:
        reason = backends.unavailable_reason(name)
        note = ""
        if train:
            # Training runs the stock conv (cuDNN/oneDNN) with the backend's BN passes (fused_resnet/training).
            note = _TRAIN_NOTES[name]
        out.append(Contender(f"fused:{name}{suffix}", "fused", cl, weights, amp, backend=name, skip=reason, note=note))
    if not train and half and hopper_engine_runs(device):  # the Hopper engine runs 16-bit convs only
        # fused:cuda runs the engine in use (by default CUTLASS's sm90 convs here); these rows, the others.
        for engine in other_cuda_engines():
            skip = engine_unfit(engine)  # first: it may leave out the trial's failing kernels, which the note says
            out.append(Contender(f"fused:cuda+{engine}{suffix}", "fused", cl, weights, amp, backend="cuda",
                                 note=engine_note(engine), cuda_engine=engine, skip=skip))  # fmt: skip
    if device.type == "cuda" and profile.graph_replays:
        # Replayed CUDA graphs: how much of each eager row (inference, or a whole train step) is host launch
        # overhead rather than GPU time.
        out.append(Contender(f"eager_cl{suffix}+graph", "eager", cl, weights, amp, compile_mode="graph"))
        for name in DEVICE_BACKENDS[device.type]:
            if backends.unavailable_reason(name) is None and name != "reference":
                out.append(Contender(f"fused:{name}{suffix}+graph", "fused", cl, weights, amp, compile_mode="graph",
                                     backend=name))  # fmt: skip
    small = device.type == "cuda" and group.batch <= profile.small_batch
    if small and not train:
        for name in DEVICE_BACKENDS[device.type]:
            if backends.unavailable_reason(name) is None and name != "reference":
                out.append(
                    Contender(
                        f"fused:{name}+cudagraphs", "fused", cl, weights, compile_mode="reduce-overhead", backend=name
                    )
                )
    if profile.compiles(group):
        out.append(Contender("compile" + suffix, "compile", cl, weights, amp, compile_mode="default"))
        if not train:
            out.append(Contender("compile_freezing", "compile", cl, weights, compile_mode="freezing"))
            if device.type == "cuda" and profile.max_autotune:
                out.append(Contender("compile_max_autotune", "compile", cl, weights, compile_mode="max-autotune"))
    if small and not train:
        out.append(Contender("compile_reduce_overhead", "compile", cl, weights, compile_mode="reduce-overhead"))
    if profile.only_contenders:
        out = [c for i, c in enumerate(out) if i == 0 or c.name in profile.only_contenders]
    return out


def hopper_engine_runs(device: torch.device) -> bool:
    """Whether the "cuda" backend's Hopper engine (CUTLASS sm90 convs) runs on this device."""
    if backends.unavailable_reason("cuda") is not None:
        return False
    from ..ops import cpp_backend

    return cpp_backend.sm90_engine_runs_on(device)


def other_cuda_engines() -> list[str]:
    """The "cuda" backend's engines other than the one in use, each benchmarked in its own row beside it."""
    from ..ops import cpp_backend

    return [engine for engine in cpp_backend.CUDA_ENGINES if engine != cpp_backend.cuda_engine()]


def engine_unfit(engine: str) -> str | None:
    """Why the engine's kernels are not run here: an engine that no GPU had run when it was added must first finish
    one call on each of its kernels, right, in a child process (fused_resnet/ops/engine_smoke.py). None: run it."""
    from ..ops import engine_smoke

    return engine_smoke.failure(engine)


def engine_note(engine: str) -> str:
    """The note of an engine's rows: the engine, and for the trial the changes it ran and any it left out."""
    from ..ops import cpp_backend, engine_smoke

    note = f"the cuda backend's {engine!r} engine"
    if engine == "cutlass_trial":
        note += f" ({', '.join(cpp_backend.trial_features())})"
    dropped = engine_smoke.dropped(engine)
    return note + (f"; left out, as they failed their first call: {dropped}" if dropped else "")


def engine_scope(cuda_engine: str | None) -> contextlib.AbstractContextManager:
    """The "cuda" backend on this engine for the body of a with-statement (None: leave the engine alone)."""
    if cuda_engine is None:
        return contextlib.nullcontext()
    from ..ops import cpp_backend

    return cpp_backend.using_cuda_engine(cuda_engine)


def fused_model(model: nn.Module, backend: str) -> nn.Module:
    """The fused copy of a torchvision ResNet (same weights and buffers), every fused module on `backend`."""
    import fused_resnet

    return fused_resnet.fuse(model, backend=backend, inplace=False)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy with every conv → BN pair folded by torch.nn.utils.fusion.fuse_conv_bn_eval (eval only)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval(), inplace=True)


_COMPILE_KWARGS: dict[str, dict] = {
    "default": {},
    # The same as torch._inductor.config.freezing = True, scoped to this compile.
    "freezing": {"options": {"freezing": True}},
    "max-autotune": {"mode": "max-autotune"},
    "reduce-overhead": {"mode": "reduce-overhead"},
}


def network(c: Contender, model: nn.Module, train: bool) -> nn.Module:
    if c.kind == "fused":
        net = fused_model(model, c.backend or "auto")
    elif c.kind == "folded":
        net = fold_bn(model)
    else:
        net = copy.deepcopy(model)
    net = net.to(dtype=c.dtype, memory_format=c.memory_format).train(train)
    if c.compile_mode is not None and c.compile_mode != "graph":
        net = torch.compile(net, dynamic=False, **_COMPILE_KWARGS[c.compile_mode])
    return net


def build(c: Contender, model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str) -> Step:
    """The step of contender c on a private copy of the fp32 model; x is the fp32 input, target the labels."""
    train = mode == "train"
    return make_step(c, network(c, model, train), x, target, train)


def make_step(c: Contender, net: nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool) -> Step:
    """One forward (no grad) or one training step of net on x, in c's dtype, memory format and autocast."""
    xin = x.to(c.dtype).contiguous(memory_format=c.memory_format)
    device_type = x.device.type

    def autocast() -> contextlib.AbstractContextManager:
        if c.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=c.autocast)

    if not train:

        def infer() -> torch.Tensor:
            with torch.no_grad(), autocast(), engine_scope(c.cuda_engine):
                return net(xin)

        return graphed(infer) if c.compile_mode == "graph" else infer

    # A small learning rate: the timed steps must not diverge on random labels.
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> torch.Tensor:
        with autocast(), engine_scope(c.cuda_engine):
            logits = net(xin)
            loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return graphed(train_step) if c.compile_mode == "graph" else train_step


def graphed(step: Step) -> Step:
    """step captured once in a CUDA graph; the returned step replays it and returns the graph's output tensor,
    which the next replay overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Outside the capture: Triton compiles, cuDNN picks its algorithms, the fold caches fill.
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay
