"""Input validation shared by every backend: errors name the argument, the value and what works."""

from __future__ import annotations

import functools

import torch

from .conv_config import ConvConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def conv_allows_tf32() -> bool:
    """Whether fp32 convs may use TF32, by cuDNN's setting (the fused kernels follow F.conv2d's convention)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses when conv and RNN were set apart through the per-op API
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (looked up once per device)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def check_activation(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
) -> tuple[int, int, int, int]:
    """Validates the operands of conv_bias_act and returns the output shape."""
    check_activation(x)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (Cout, Cin/groups, KH, KW), got shape {tuple(weight.shape)}")
    if min(weight.shape[1:]) < 1:  # as torch's conv refuses it (the Triton kernel would return act(bias))
        raise ValueError(f"weight must have a non-empty kernel (Cin/groups, KH, KW), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match the input dtype {x.dtype}")
    if x.shape[1] != weight.shape[1] * config.groups:
        raise ValueError(
            f"input has {x.shape[1]} channels but the weight expects {weight.shape[1] * config.groups} "
            f"(Cin/groups={weight.shape[1]}, groups={config.groups})"
        )
    if weight.shape[0] % config.groups != 0:
        raise ValueError(f"Cout={weight.shape[0]} is not divisible by groups={config.groups}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != torch.float32 and bias.dtype != x.dtype:
        raise TypeError(f"bias must be float32 (or the input dtype), got {bias.dtype}")
    tensors = {"weight": weight, "bias": bias}
    out_shape = config.output_shape(x, weight)
    if min(out_shape[2:]) <= 0:
        raise ValueError(
            f"input spatial size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} kernel with {config}"
        )
    if residual is not None:
        tensors["residual"] = residual
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output shape {out_shape}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} must match the input dtype {x.dtype}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move both to one device")
    return out_shape
