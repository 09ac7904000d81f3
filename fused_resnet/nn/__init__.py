"""Fused modules and the functional calls behind them."""

from .conv_bn_act import ConvBNAct
from .functional import bn_act, conv_bn_act

__all__ = ["ConvBNAct", "bn_act", "conv_bn_act"]
