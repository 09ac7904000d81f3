"""fused_resnet: ResNets for PyTorch with conv + BatchNorm + residual + ReLU fused into single kernels."""

from ._version import __version__
from .fuse import FuseWarning, fuse, set_backend, unfuse
from .models import *  # noqa: F403  (the builders are re-exported at the top, like torchvision.models)
from .models import __all__ as _models_all
from .nn import ConvBNAct
from .nn.folding import clear_caches

__all__ = ["ConvBNAct", "FuseWarning", "__version__", "clear_caches", "fuse", "set_backend", "unfuse", *_models_all]

from .backends import load_backends as _load_backends  # noqa: E402

_load_backends()
