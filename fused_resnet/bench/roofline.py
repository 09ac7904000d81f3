"""Per-layer roofline: what the hardware could do at best for a model, given a kernel structure.

Each layer costs max(FLOPs / peak, bytes / bandwidth). FLOPs come from torch.utils.flop_counter; bytes from the
model's own tensor shapes (found by tracing it on the meta device), under one of three kernel structures:

- "fused":   conv + BN + [add] + [ReLU] in one kernel: read input + weight (+ residual), write output once;
- "compile": a conv kernel, then one fused pointwise kernel (BN/add/ReLU): one more write + read of the output;
- "eager":   separate BN, add and ReLU kernels, each reading and writing the whole activation.

An estimate, not a measurement: it ignores caches (L2 can hold small layers' activations), tile quantization and
launch latency, which matter most at small batch.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..ops.checks import conv_allows_tf32

STRUCTURES = ("fused", "compile", "eager")


@dataclass(frozen=True)
class DevicePeaks:
    """Peak dense throughput per compute precision (TFLOP/s) and memory bandwidth (TB/s) of one device."""

    name: str
    tflops: dict[str, float]  # keys: "bf16", "fp16", "tf32", "fp32"
    bandwidth_tbs: float
    source: str


def _datasheet(name: str, half: float, tf32: float, fp32: float, bandwidth: float) -> DevicePeaks:
    return DevicePeaks(name, {"bf16": half, "fp16": half, "tf32": tf32, "fp32": fp32}, bandwidth, "datasheet")


# Datasheet dense (no sparsity) peaks, TFLOP/s and TB/s, matched against torch.cuda.get_device_name() in order.
_DATASHEET = (
    ("H200", _datasheet("H200", 989.4, 494.7, 66.9, 4.8)),
    ("H100 PCIe", _datasheet("H100 PCIe", 756.0, 378.0, 51.2, 2.0)),
    ("H100", _datasheet("H100 SXM", 989.4, 494.7, 66.9, 3.35)),
    ("A100-SXM4-40GB", _datasheet("A100 40GB", 312.0, 156.0, 19.5, 1.555)),
    ("A100", _datasheet("A100 80GB", 312.0, 156.0, 19.5, 2.0)),
)


def datasheet_peaks(device_name: str) -> DevicePeaks | None:
    """The datasheet peaks of a GPU by its torch.cuda.get_device_name(), or None if it is not in the table."""
    for key, peaks in _DATASHEET:
        if key in device_name:
            return peaks
    return None


def precision_key(dtype: torch.dtype, device_type: str) -> str:
    """Which peak applies: fp32 convs run on TF32 tensor cores on a GPU unless cuDNN's TF32 is switched off."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if device_type == "cuda" and conv_allows_tf32():
        return "tf32"
    return "fp32"


def measure_peaks(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> DevicePeaks:
    """Peaks measured on the spot: the best of a few large matmuls per dtype and a large device copy."""
    from .timing import best_ms

    size = 8192 if device.type == "cuda" else 1024
    tflops: dict[str, float] = {}
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype in dict.fromkeys((torch.bfloat16, *dtypes)):
            key = precision_key(dtype, device.type)
            # fp32 convs run on TF32 tensor cores (cuDNN's default): measure the matmul the same way.
            torch.backends.cuda.matmul.allow_tf32 = key == "tf32"
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            ms = best_ms(lambda a=a, b=b: a @ b, device)
            tflops[key] = 2 * size**3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    numel = (1 << 28 if device.type == "cuda" else 1 << 25) // 4
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    ms = best_ms(lambda: dst.copy_(src), device)
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    return DevicePeaks(_device_name(device), tflops, bandwidth, "measured")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# The model's layers, from its traced graph


@dataclass(frozen=True)
class Layer:
    """One layer of the traced model: a conv with what follows it, a pool, or the classifier."""

    name: str
    kind: str  # "conv", "pool", "linear"
    flops: int
    input_elems: int
    weight_elems: int
    output_elems: int
    bn: bool = False
    residual: bool = False
    relu: bool = False
    # conv geometry, for grouping layers by shape: (Cin, Cout, KH, KW, stride, padding, H, W, groups)
    geometry: tuple[int, ...] = ()
    output_hw: tuple[int, ...] = ()


def _is_module(node: fx.Node, modules: dict[str, nn.Module], kinds: tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], kinds)


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return _is_module(node, modules, (nn.ReLU,))


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _epilogue(conv: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, bool, bool]:
    """(bn, residual, relu) after a conv. The residual belongs to the branch that is the add's first operand
    (`out += identity`); the shortcut branch (the add's second operand) ends at its BN."""
    bn = residual = relu = False
    node = _only_user(conv)
    if node is not None and _is_module(node, modules, (nn.BatchNorm2d,)):
        bn, last = True, node
        node = _only_user(node)
    else:
        last = conv
    if node is not None and _is_add(node):
        if node.args[0] is not last:
            return bn, False, False
        residual, node = True, _only_user(node)
    if node is not None and _is_relu(node, modules):
        relu = True
    return bn, residual, relu


def _flops(fn: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def model_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """The conv (with its BN/add/ReLU epilogue), pool and linear layers of a traceable model, in order.

    The model is copied to the meta device, so this is cheap at any batch size.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    graph = fx.symbolic_trace(meta)
    ShapeProp(graph).propagate(torch.empty(input_shape, device="meta"))
    modules = dict(graph.named_modules())
    layers = []
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        src = node.args[0]
        in_shape, out_shape = src.meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
        in_elems, out_elems = _numel(in_shape), _numel(out_shape)
        x = torch.empty(in_shape, device="meta")
        if isinstance(module, nn.Conv2d):
            bn, residual, relu = _epilogue(node, modules)
            geometry = (
                module.in_channels,
                module.out_channels,
                *module.kernel_size,
                module.stride[0],
                module.padding[0],
                in_shape[2],
                in_shape[3],
                module.groups,
            )
            layers.append(
                Layer(
                    node.target,
                    "conv",
                    _flops(module, x),
                    in_elems,
                    module.weight.numel(),
                    out_elems,
                    bn,
                    residual,
                    relu,
                    geometry,
                    tuple(out_shape[2:]),
                )
            )
        elif isinstance(module, nn.Linear):
            layers.append(Layer(node.target, "linear", _flops(module, x), in_elems, module.weight.numel(), out_elems))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            layers.append(Layer(node.target, "pool", 0, in_elems, 0, out_elems))
    return layers


def _numel(shape: torch.Size) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_flops(model: nn.Module, input_shape: tuple[int, ...], train: bool = False) -> int:
    """FLOPs of one forward (train=True: forward + backward) of the whole model, counted on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    meta.train(train)
    x = torch.empty(input_shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = meta(x)
        if train:
            out.sum().backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------
# Bytes and ceilings


def layer_bytes(layer: Layer, structure: str, element_size: int) -> int:
    """Bytes a layer moves through memory under a kernel structure (see the module docstring)."""
    if structure not in STRUCTURES and structure != "train":
        raise ValueError(f"structure must be one of {STRUCTURES} or 'train', got {structure!r}")
    i, w, o = layer.input_elems, layer.weight_elems, layer.output_elems
    elems = i + w + o
    has_epilogue = layer.bn or layer.residual or layer.relu
    if structure == "fused":
        elems += o if layer.residual else 0
    elif structure == "compile":
        elems += (o if layer.residual else 0) + (2 * o if has_epilogue else 0)
    elif structure == "eager":
        elems += 2 * o * layer.bn + 3 * o * layer.residual + 2 * o * layer.relu
    elif layer.kind != "pool":
        # train with fused kernels (design.md §3): forward as "fused"; BN/ReLU backward folded into the gradient
        # kernels, so dgrad reads the output gradient + W and writes I, wgrad reads the output gradient + I and
        # writes W.
        elems += (o if layer.residual else 0) + (o + w + i) + (o + i + w)
    else:
        elems *= 2
    return elems * element_size


def ceiling_seconds(
    layers: list[Layer], peaks: DevicePeaks, dtype: torch.dtype, device_type: str, structure: str
) -> float:
    """Σ over layers of max(FLOPs / peak, bytes / bandwidth); structure "compute" counts FLOPs only.

    "train" counts 3× the forward FLOPs (backward ≈ 2× forward) with the train byte count of layer_bytes.
    """
    peak = peaks.tflops[precision_key(dtype, device_type)] * 1e12
    bandwidth = peaks.bandwidth_tbs * 1e12
    element_size = torch.empty((), dtype=dtype).element_size()
    flop_factor = 3 if structure == "train" else 1
    total = 0.0
    for layer in layers:
        compute = flop_factor * layer.flops / peak
        if structure == "compute":
            total += compute
        else:
            total += max(compute, layer_bytes(layer, structure, element_size) / bandwidth)
    return total


def ceilings(
    layers: list[Layer], batch: int, peaks: DevicePeaks, dtype: torch.dtype, device_type: str
) -> dict[str, float]:
    """Images/s ceilings per structure ("compute", "fused", "compile", "eager", "train") for layers of one batch."""
    return {
        structure: batch / ceiling_seconds(layers, peaks, dtype, device_type, structure)
        for structure in ("compute", *STRUCTURES, "train")
    }
