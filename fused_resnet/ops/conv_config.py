"""The static description of one convolution, shared by every backend."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn


def _pair(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvConfig:
    """stride/padding/dilation/groups of a 2-D convolution (zero padding only)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        # As torch's conv refuses them (output_hw would divide by a zero stride).
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0 or self.groups < 1:
            raise ValueError(
                f"invalid convolution: stride {self.stride} and dilation {self.dilation} must be positive, padding "
                f"{self.padding} non-negative and groups {self.groups} at least 1"
            )

    @staticmethod
    def from_conv(conv: nn.Conv2d) -> ConvConfig:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported; give explicit integers")
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if torch.compiler.is_compiling():  # traced once, and Dynamo warns about lru_cache wrappers
            return _config_of.__wrapped__(*args)
        try:
            return _config_of(*args)
        except TypeError:  # unhashable (lists set by hand): not worth caching
            return _config_of.__wrapped__(*args)

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def output_shape(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
        oh, ow = self.output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
        return (x.shape[0], weight.shape[0], oh, ow)


@functools.lru_cache(maxsize=256)
def _config_of(stride: object, padding: object, dilation: object, groups: int) -> ConvConfig:
    # Cached: every fused call asks, and building one cost a few µs of host time (a ResNet has few distinct ones).
    return ConvConfig(_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
