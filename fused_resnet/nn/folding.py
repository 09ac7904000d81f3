"""BatchNorm folding for eval mode: W' = W·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε), computed in fp32.

Folding in bf16/fp16 measurably hurts accuracy, so the fold runs in fp32 (fp64 for fp64 models); W' is then
cast to the compute dtype and b' stays fp32. The result is cached on the conv module, keyed on the
parameters' version counters, storage and dtype, so load_state_dict, an optimizer step or .to() invalidates it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import cpp_backend

_CACHE_ATTR = "_fused_resnet_fold_cache"


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm2d/FrozenBatchNorm2d, in fp32 (fp64 stays fp64)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift


def fold_conv_bn(
    conv_weight: torch.Tensor, bn: nn.Module | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight in `dtype`, channels_last; bias in fp32) of conv → eval BN; differentiable.
    bn=None (a conv with no BN after it): the weight cast and repacked, a zero bias."""
    if bn is None:
        bias = torch.zeros(conv_weight.shape[0], dtype=torch.float32, device=conv_weight.device)
        return conv_weight.to(dtype).contiguous(memory_format=torch.channels_last), bias
    scale, shift = bn_scale_shift(bn)
    weight = (conv_weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype)
    return weight.contiguous(memory_format=torch.channels_last), shift


def _tensors(conv: nn.Conv2d, bn: nn.Module | None) -> list[torch.Tensor]:
    if bn is None:
        return [conv.weight]
    candidates = (conv.weight, getattr(bn, "weight", None), getattr(bn, "bias", None), bn.running_mean, bn.running_var)
    return [t for t in candidates if t is not None]


def _cache_key(tensors: list[torch.Tensor], bn: nn.Module | None, dtype: torch.dtype) -> tuple | None:
    try:
        state = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter: never cache them
        return None
    return (dtype, None if bn is None else float(bn.eps), state)


def folded_conv_bn(conv: nn.Conv2d, bn: nn.Module | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_conv_bn, cached when no gradient is wanted (a cached tensor must not carry autograd history)."""
    tensors = _tensors(conv, bn)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # Under torch.compile the fold is traced into the graph (and constant-folded with freezing).
    if needs_grad or torch.compiler.is_compiling():
        return fold_conv_bn(conv.weight, bn, dtype)
    key = _cache_key(tensors, bn, dtype)
    cached = conv.__dict__.get(_CACHE_ATTR)
    if key is not None and cached is not None and cached[0] == key:
        weight, bias = cached[1]
        # A fold made inside inference_mode is an inference tensor, unusable outside it.
        if torch.is_inference_mode_enabled() or not weight.is_inference():
            return weight, bias
    # Folded outside inference mode (when the parameters allow it) so that the result is an ordinary tensor:
    # usable later outside inference_mode, and cacheable by backends that key on version counters (the CPU
    # backend's prepacked oneDNN weights).
    with torch.inference_mode(conv.weight.is_inference()), torch.no_grad():
        folded = fold_conv_bn(conv.weight, bn, dtype)
    if key is not None:
        conv.__dict__[_CACHE_ATTR] = (key, folded)
        cpp_backend.allow_prepacking(folded[0])  # kept: the CPU backend may keep its oneDNN-layout copy
    return folded


def clear_fold_cache(conv: nn.Conv2d) -> None:
    conv.__dict__.pop(_CACHE_ATTR, None)
