"""Backend selection: auto, explicit names, the environment override and the fallback rule."""

import pytest
import torch

from fused_resnet import backends
from fused_resnet.ops.conv_config import ConvConfig


def _call():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    return x, w, None, ConvConfig(padding=(1, 1))


def test_reference_always_available():
    assert "reference" in backends.available_backends()
    assert backends.select("reference", *_call()).name == "reference"


def test_auto_picks_an_available_backend_for_cpu():
    chosen = backends.select("auto", *_call())
    assert chosen.name in backends.AUTO_ORDER["cpu"]
    assert backends.unavailable_reason(chosen.name) is None


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.select("tpu", *_call())


def test_environment_override(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "reference")
    assert backends.select("auto", *_call()).name == "reference"
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.select("auto", *_call())


def test_explicit_backend_that_cannot_run_is_an_error_unless_fallback_allowed(monkeypatch):
    # The "cuda" backend never runs CPU tensors.
    with pytest.raises(backends.BackendError, match="cuda"):
        backends.select("cuda", *_call(), allow_fallback=False)
    assert backends.select("cuda", *_call(), allow_fallback=True).name == "reference"
    monkeypatch.setenv("FUSED_RESNET_ALLOW_FALLBACK", "1")
    assert backends.select("cuda", *_call()).name == "reference"
