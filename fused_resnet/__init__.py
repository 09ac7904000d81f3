"""fused_resnet: ResNets for PyTorch with conv + BatchNorm + residual + ReLU fused into single kernels."""

from ._version import __version__
from .nn import ConvBNAct

__all__ = ["ConvBNAct", "__version__"]
