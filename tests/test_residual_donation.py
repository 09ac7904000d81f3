"""Blocks writing their output into a dead residual's memory (models/_layers.py, conv_bias_act_into_residual):
it happens exactly where the residual is dead and no one can see it, and never changes a result or a tensor that
the caller (or a hook) holds. The reference is the same model with the in-place path off, and torchvision."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet
from fused_resnet import backends
from fused_resnet.check import randomize_bn_
from fused_resnet.models._layers import ResidualLayer, StemMaxPool2d

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason="needs the extension's cpu backend"
)


class _CountInPlace(TorchDispatchMode):
    """Counts calls of the in-place op (seen at the dispatcher, independently of the Python code that chose it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == "fused_resnet_C::conv_bias_act_into_residual":
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    with _CountInPlace() as counter:
        out = model(x)
    return out, counter.calls


def _model(name: str) -> nn.Module:
    return randomize_bn_(getattr(fused_resnet, name)(num_classes=10, backend="cpu")).eval()


@pytest.mark.parametrize(
    "name, donated",
    [
        ("resnet18", 7),  # all 8 blocks but layer1[0]: identity shortcut on the layer's input
        ("resnet50", 16),  # every block: block 0 of each layer has a projection, the others a dead input
        ("resnet20", 8),  # option A: the stride-2 shortcuts are fresh tensors, layer1[0]'s input is not dead
        ("preact_resnet164", 54),
    ],
)
def test_blocks_write_into_dead_residuals_only(name, donated):
    model = _model(name)
    hw = 64 if name.startswith("resnet") and name != "resnet20" else 16
    x = torch.randn(2, 3, hw, hw).contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    with torch.no_grad():
        got, calls = _run(model, x)
        with torch.enable_grad():  # with autograd on, nothing is written in place
            want, calls_with_grad = _run(model, x)
    assert calls == donated and calls_with_grad == 0
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x_before)


def test_matches_torchvision_under_inference_mode():
    tv = randomize_bn_(torchvision.models.resnet50(num_classes=10)).eval()
    fused = fused_resnet.fuse(tv, backend="cpu")
    assert type(fused.layer1) is ResidualLayer
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got, calls = _run(fused, x)
        want = tv(x)
    assert calls == 16
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_hooked_block_output_is_left_alone():
    model = _model("resnet18")
    seen = {}
    model.layer1[0].register_forward_hook(lambda module, args, out: seen.update(out=out, copy=out.clone()))
    with torch.no_grad():
        _, calls = _run(model, torch.randn(1, 3, 32, 32))
    assert calls == 6  # layer1[1] no longer writes into layer1[0]'s output
    assert torch.equal(seen["out"], seen["copy"])


@pytest.mark.parametrize("where", ["relu", "conv1"])
def test_a_hook_inside_a_block_keeps_its_tensors_alive(where):
    # Activation capture (Grad-CAM) hooks a block's relu, whose output is the block's: an audit found the next block
    # writing into it (15.1 off on a 3.7 scale). A pre-hook on the next block's first conv sees that same tensor.
    model = _model("resnet18")
    seen = {}
    if where == "relu":
        model.layer1[0].relu.register_forward_hook(lambda module, args, out: seen.update(t=out, copy=out.clone()))
    else:
        hook = lambda module, args: seen.update(t=args[0], copy=args[0].clone())  # noqa: E731
        model.layer1[1].conv1.register_forward_pre_hook(hook)
    with torch.no_grad():
        _, calls = _run(model, torch.randn(1, 3, 32, 32))
    assert calls == 6  # layer1[1] no longer writes into layer1[0]'s output
    assert torch.equal(seen["t"], seen["copy"])


def test_a_block_whose_forward_was_replaced_is_called_plainly():
    model = _model("resnet18")
    block = model.layer1[1]
    plain = block.forward
    block.forward = lambda x: plain(x)  # a user's wrapper, without the donate_x argument
    with torch.no_grad():
        _, calls = _run(model, torch.randn(1, 3, 32, 32))
    assert calls == 6


def test_global_hooks_and_pre_hooks_turn_it_off():
    model = _model("resnet50")
    x = torch.randn(1, 3, 32, 32)
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        with torch.no_grad():
            # Global module hooks make every conv and BN run its own forward (so that the hooks see them): nothing
            # writes into a residual then.
            assert _run(model, x)[1] == 0
    finally:
        handle.remove()
    model.layer2[1].register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad():
        assert _run(model, x)[1] == 15


def test_calling_a_layer_or_block_directly_never_touches_its_input():
    model = _model("resnet18")
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    with torch.no_grad():
        model.layer1(x)
        model.layer1[1](x)
    assert torch.equal(x, x_before)


def test_unknown_blocks_in_a_layer_are_not_trusted():
    # A user's module in a stage may return its input (nn.Identity): the next block's input is then the layer's.
    model = _model("resnet18")
    model.layer1 = ResidualLayer(nn.Identity(), *model.layer1)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    with torch.no_grad():
        model.layer1(x)
    assert torch.equal(x, x_before)


def test_fuse_and_unfuse_retype_only_the_stages_and_the_stem_pool():
    tv = torchvision.models.resnet18()
    fused = fused_resnet.fuse(tv)
    assert [type(getattr(fused, f"layer{i}")) for i in range(1, 5)] == [ResidualLayer] * 4
    assert type(fused.maxpool) is StemMaxPool2d
    assert type(fused.layer2[0].downsample) is nn.Sequential
    assert fused.state_dict().keys() == tv.state_dict().keys()
    back = fused_resnet.unfuse(fused)
    assert all(type(m) is not ResidualLayer for m in back.modules())
    assert type(back.layer1) is nn.Sequential
    assert type(back.maxpool) is nn.MaxPool2d


def test_compiled_model_is_unchanged():
    model = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_the_receiving_block_sees_its_true_input():
    model = _model("resnet18")
    seen = {}
    model.layer1[1].register_forward_hook(lambda module, args, out: seen.update(x=args[0].clone(), out=out))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        want = model.layer1[0](model.maxpool(model_stem(model, x)))
    torch.testing.assert_close(seen["x"], want)


def model_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from fused_resnet.models._common import prepare_input
    from fused_resnet.nn.functional import conv_bn_act

    return conv_bn_act(prepare_input(x, model.conv1), model.conv1, model.bn1, relu=True, backend="cpu")


def test_a_symbolic_trace_records_no_donation():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _model("resnet18")
    leaves = {"leaf_modules": [fused_resnet.models.BasicBlock]}
    extractor = create_feature_extractor(model.layer1, return_nodes=["0", "1"], tracer_kwargs=leaves)
    assert all(not n.kwargs for n in extractor.graph.nodes if n.op == "call_module")
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        got = extractor(x)
        want0 = model.layer1[0](x)
    torch.testing.assert_close(got["0"], want0)


def test_subclassed_blocks_are_not_trusted():
    class KeepsOutput(fused_resnet.models.BasicBlock):
        def forward(self, x):  # another signature, and it keeps its output
            self.kept = super().forward(x)
            return self.kept

    model = _model("resnet18")
    model.layer1[0].__class__ = KeepsOutput
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        kept = model.layer1[0].kept.clone()
        model.layer1[1](kept.clone())  # the next block ran on it in the model: it must still hold what it kept
    torch.testing.assert_close(model.layer1[0].kept, kept)


def test_the_in_place_op_refuses_autograd():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    r = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    args = (x, w, torch.zeros(4), r, None, None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.ops.fused_resnet_C.conv_bias_act_into_residual(*args)
    with torch.no_grad():
        torch.ops.fused_resnet_C.conv_bias_act_into_residual(*args)
