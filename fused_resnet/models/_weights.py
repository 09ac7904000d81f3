"""Loading weights: a state dict or a file path, never a download, never code from a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

Weights = Mapping[str, torch.Tensor] | str | os.PathLike | None


def load_weights(model: nn.Module, weights: Weights) -> nn.Module:
    """Loads `weights` strictly into `model` (no-op for None) and returns the model.

    Files are read with weights_only=True so a checkpoint cannot run code; a dict saved under a "state_dict"
    or "model" key is unwrapped. Torchvision's WeightsEnum is refused: it would download.
    """
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and not _is_state_dict(state):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], Mapping):
                    state = state[key]
                    break
    elif isinstance(weights, Mapping):
        state = weights
    else:
        raise TypeError(
            f"weights must be a state dict or a path to a saved state dict, got {type(weights).__name__}; "
            "fused_resnet downloads nothing: load torchvision weights yourself and pass their state_dict()"
        )
    model.load_state_dict(state, strict=True)
    return model


def _is_state_dict(state: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in state.values())
