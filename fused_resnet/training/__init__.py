"""Fused training: train-mode conv → BatchNorm → [+ residual] → [ReLU] with batch statistics.

stats.py     per-channel (count, mean, M2) partials, Chan's merge, and finalize (running-stat update, once)
channel_math.py       finalize + scale/shift, and backward's coefficients, as one Triton launch each (eager CUDA)
sync.py      synchronized statistics across processes (enable_sync_bn)
conv_bn_act_train.py  the autograd Function: recompute-instead-of-store backward
projection_train.py   a block end with a projection shortcut: both convs, both BNs applied in one pass
recipes.py   how a unit's output is remade in backward instead of kept (chains through the blocks)
max_pool_train.py     the stem's max-pool, remaking its input in backward
passes.py    the Function's passes over the conv output, chosen per backend: torch_passes.py (PyTorch ops),
             cpp_passes.py (the extension's CPU kernels), triton_passes.py (Triton kernels)
"""

from .conv_bn_act_train import ConvBNActTrain, conv_bn_act_train
from .stats import BatchStats, batch_stats, finalize, merge_partials
from .sync import disable_sync_bn, enable_sync_bn

__all__ = [
    "BatchStats",
    "ConvBNActTrain",
    "batch_stats",
    "conv_bn_act_train",
    "disable_sync_bn",
    "enable_sync_bn",
    "finalize",
    "merge_partials",
]
