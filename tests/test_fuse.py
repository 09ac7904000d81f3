"""fuse()/unfuse(): conversion of torchvision models, round trips, and what is left alone."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from fused_resnet import FuseWarning, fuse, set_backend, unfuse
from fused_resnet.check import randomize_bn_
from fused_resnet.models import resnet as fused_models
from fused_resnet.tolerances import relative_error


def _x(n=2, h=64, w=64):
    return torch.randn(n, 3, h, w, dtype=torch.float64)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fuse_keeps_outputs_and_state_dict(name):
    reference = randomize_bn_(getattr(torchvision.models, name)()).double().eval()
    fused = fuse(reference)
    assert type(fused) is fused_models.ResNet and type(reference) is torchvision.models.ResNet  # a copy
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = _x()
    with torch.no_grad():
        assert relative_error(fused(x), reference(x)) <= 1e-12


def test_fuse_keeps_mode_device_dtype_and_trained_state():
    reference = randomize_bn_(torchvision.models.resnet18()).double().train()
    reference(_x())  # a train step changes running stats and num_batches_tracked
    fused = fuse(reference)
    assert fused.training and fused.conv1.weight.dtype == torch.float64
    for (k, a), b in zip(fused.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fuse_inplace_and_round_trip():
    reference = randomize_bn_(torchvision.models.resnet18()).double().eval()
    original = copy.deepcopy(reference)
    fused = fuse(reference, inplace=True)
    assert fused is reference and type(fused) is fused_models.ResNet
    back = unfuse(fused)
    assert type(back) is torchvision.models.ResNet and type(back.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert not hasattr(back, "backend") and not hasattr(back.layer1[0], "backend")
    with torch.no_grad():
        x = _x()
        assert torch.equal(back(x), original(x))


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def _in_layout(w: torch.Tensor, memory_format: torch.memory_format) -> bool:
    # Exact strides: is_contiguous cannot tell the layouts of a 1x1 kernel (the downsample convs) apart.
    return w.stride() == torch.empty(w.shape, memory_format=memory_format).stride()


def test_fused_copies_and_built_models_keep_conv_weights_channels_last():
    cl, plain = torch.channels_last, torch.contiguous_format
    tv = torchvision.models.resnet18()
    fused = fuse(tv)
    assert all(_in_layout(w, cl) for w in _conv_weights(fused))
    assert all(_in_layout(w, plain) for w in _conv_weights(tv))  # the original is untouched
    assert all(_in_layout(w, plain) for w in _conv_weights(unfuse(fused)))
    built = [fused_resnet.resnet50(), fused_resnet.resnet20(), fused_resnet.preact_resnet164()]
    assert all(_in_layout(w, cl) for b in built for w in _conv_weights(b))


def test_in_place_conversion_leaves_the_parameters_alone():
    # An optimizer may hold per-element state paired by memory position (fused Adam): changing a parameter's
    # layout under it would silently corrupt the update.
    tv = torchvision.models.resnet18()
    params = [(p, p.stride()) for p in tv.parameters()]
    fused = fuse(tv, inplace=True)
    assert [(p, p.stride()) for p in fused.parameters()] == params
    back = unfuse(fused, inplace=True)
    assert [(p, p.stride()) for p in back.parameters()] == params


def test_unfuse_of_a_built_model_gives_torchvision():
    model = fused_resnet.resnet50().eval()
    stock = unfuse(model)
    assert type(stock) is torchvision.models.ResNet
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert relative_error(stock(x), model(x)) <= 1e-5


def test_nested_resnet_is_found():
    wrapper = nn.Sequential(nn.Identity(), torchvision.models.resnet18(num_classes=4), nn.Softmax(dim=1))
    fused = fuse(wrapper)
    assert type(fused[1]) is fused_models.ResNet and type(fused[2]) is nn.Softmax


def test_unrecognised_structures_are_left_untouched_and_reported():
    class MyBlock(torchvision.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = torchvision.models.resnet18()
    model.layer1[0] = MyBlock(64, 64)
    model.layer2[1].bn1 = nn.GroupNorm(4, 128)
    with pytest.warns(FuseWarning) as record:
        fused = fuse(model)
    message = str(record[0].message)
    assert "layer1.0 (MyBlock)" in message and "layer2.1 (BasicBlock): bn1 is GroupNorm" in message
    assert type(fused.layer1[0]) is MyBlock
    assert type(fused.layer2[1]) is torchvision.models.resnet.BasicBlock
    assert type(fused.layer2[0]) is fused_models.BasicBlock
    with torch.no_grad():
        model.eval(), fused.eval()
        x = torch.randn(1, 3, 64, 64)
        assert relative_error(fused(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="unconverted"):
        fuse(model, strict=True)


def test_fuse_rejects_models_without_a_resnet_and_bad_backends():
    with pytest.raises(ValueError, match="no torchvision ResNet"):
        fuse(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="unknown backend"):
        fuse(torchvision.models.resnet18(), backend="tpu")


def test_set_backend_reaches_every_fused_module():
    model = fuse(torchvision.models.resnet18(), backend="reference")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"reference"}
    set_backend(model, "auto")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"auto"}


def test_no_warning_for_clean_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(torchvision.models.resnet50())


def test_sync_batchnorm_converted_after_fusing_trains_on_batch_statistics():
    # The usual DDP recipe converts BNs to nn.SyncBatchNorm after the model is built: those must train on batch
    # statistics (their own forward) and fold in eval, as torchvision's would (an audit found them folded in train).
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fuse(tv))
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(tv)
    x = torch.randn(4, 3, 32, 32)
    tv.train(), fused.train()
    # fp32, but channels_last against NCHW convs, normalized by 4 samples' statistics in layer4 (1x1 pixels): 1e-4.
    # The folded running statistics of the bug were off by about half the output's scale.
    assert relative_error(fused(x), tv(x)) < 1e-4
    assert relative_error(fused.bn1.running_mean, tv.bn1.running_mean) < 1e-5
    assert fused.bn1.num_batches_tracked.item() == tv.bn1.num_batches_tracked.item() == 1
    tv.eval(), fused.eval()
    with torch.no_grad():
        assert relative_error(fused(x), tv(x)) < 1e-5


def test_a_block_whose_relu_is_another_activation_is_left_as_is():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    tv.layer1[0].relu = nn.SiLU()
    with pytest.warns(FuseWarning, match="relu is SiLU, not nn.ReLU"):
        fused = fuse(tv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fused(x), tv(x)) < 1e-5
    # Swapped after fusing: that block runs its modules' own forwards.
    fused.layer2[0].relu, tv.layer2[0].relu = nn.SiLU(), nn.SiLU()
    with torch.no_grad():
        assert relative_error(fused(x), tv(x)) < 1e-5


class _HalvedShortcut(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("training", [False, True])
def test_a_hooked_or_subclassed_downsample_runs_itself(training):
    # An audit found hooks on a block's downsample container never firing, and an nn.Sequential subclass with its own
    # forward fused as a plain conv + BN (1.15 off on a 2.8 scale, no warning).
    torch.manual_seed(0)
    tv = randomize_bn_(torchvision.models.resnet18(num_classes=10)).double().train(training)
    fused = fuse(tv)
    calls = []
    for net in (tv, fused):
        net.layer2[0].downsample.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0.5)
        net.layer3[0].downsample = _HalvedShortcut(*net.layer3[0].downsample)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert relative_error(fused(x), tv(x)) < 1e-10
    assert len(calls) == 2


class _NanShortcut(nn.Module):
    def __init__(self, downsample: nn.Module) -> None:
        super().__init__()
        self.downsample = downsample

    def forward(self, x):
        out = self.downsample(x)
        out[0, 0, 0, 0] = float("nan")
        return out


def _nan_case(case: str, model: nn.Module, x: torch.Tensor) -> None:
    if case == "input":
        x[0, 1, 5, 7] = float("nan")
    elif case == "weight":  # a diverged checkpoint
        with torch.no_grad():
            model.layer2[1].conv1.weight[3, 0, 0, 0] = float("nan")
    else:  # a module of the user's inside the model makes one
        model.layer3[0].downsample = _NanShortcut(model.layer3[0].downsample)


@pytest.mark.parametrize("case", ["input", "weight", "user_module"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nan_gives_nan_logits_as_stock(backend, case):
    # The cpu backend's oneDNN ReLU post-op made NaN 0: a corrupt image gave finite logits (an audit). Its convs now
    # scan their activations unless the model's forward found its input finite with only its own modules inside.
    torch.manual_seed(0)
    tv = randomize_bn_(torchvision.models.resnet18(num_classes=10)).eval()
    fused = fuse(tv, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    for net in (tv, fused):
        _nan_case(case, net, x)
    with torch.no_grad():
        got, want = fused(x), tv(x)
    assert torch.isnan(want[0]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    if case == "input":
        assert relative_error(got[1], want[1]) < 1e-5


@pytest.mark.parametrize("which", ["bn1", "bn2"])
def test_a_nan_bn_statistic_in_a_preact_net_gives_nan_logits(which):
    # A pre-activation BN's NaN reaches the next conv through its prologue or a separate bn_act: the convs after it
    # must see the NaN that makes (compared with the reference backend: stock convs, NaN kept).
    torch.manual_seed(0)
    model = randomize_bn_(fused_resnet.preact_resnet164(num_classes=10)).eval()
    with torch.no_grad():
        getattr(model.layer2[0], which).running_var[2] = -4.0  # rsqrt of a negative variance: NaN
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = set_backend(model, "reference")(x)
        got = set_backend(model, "auto")(x)
    assert torch.isnan(want).all() and torch.isnan(got).all()


def test_the_nan_scans_are_off_only_inside_a_clean_forward(monkeypatch):
    from fused_resnet.ops import cpp_backend

    if not cpp_backend.has_cpu_input_scans():
        pytest.skip("needs the extension's cpu backend")
    seen = []
    real = cpp_backend.set_cpu_input_scans
    monkeypatch.setattr(cpp_backend, "set_cpu_input_scans", lambda on: seen.append(on) or real(on))
    model = fused_models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert seen == [False, True] and cpp_backend._C.cpu_input_scans_enabled()
        seen.clear()
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)
        handle = model.layer1[0].bn1.register_forward_hook(lambda *args: None)
        model(x)
        handle.remove()
        model.layer1[0].bn1.train()  # a BN left training: its unit is no fused eval call
        model(x)
        model.layer1[0].bn1.eval()
        model.fc = nn.Sequential(nn.Linear(512, 10), nn.Softmax(dim=1))  # a part of the user's
        model(x)
    assert seen == []


@pytest.mark.parametrize("case", ["large_weights", "small_variance"])
def test_activations_that_overflow_give_nan_logits_as_stock(case):
    # A finite input whose activations pass fp32's range mid-network: the convs' sums make infinities, then NaN,
    # which oneDNN's ReLU post-op made 0 while the scans were off (an audit: 20 finite logits where stock gave NaN).
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for module in tv.modules():
            if case == "large_weights" and isinstance(module, nn.Conv2d):
                module.weight.mul_(1e5)  # a diverged checkpoint, every value finite
            if case == "small_variance" and isinstance(module, nn.BatchNorm2d):
                module.running_var.fill_(1e-4)
    fused = fuse(tv)
    x = torch.randn(2, 3, 32, 32) * (1e30 if case == "large_weights" else 1e20)
    with torch.no_grad():
        got, want = fused(x), tv(x)
    assert torch.isnan(want).all() and torch.isnan(got).all()


def test_each_conv_output_is_within_its_bound(monkeypatch):
    # The bounds that keep the NaN scans off (nn/activation_bounds.py) must hold for every value they bound.
    from fused_resnet.nn import activation_bounds
    from fused_resnet.ops import cpp_backend

    if not cpp_backend.has_cpu_input_scans():
        pytest.skip("needs the extension's cpu backend")
    recorded = []
    real = activation_bounds.record
    monkeypatch.setattr(
        activation_bounds, "record", lambda out, bound: recorded.append((out.clone(), bound)) or real(out, bound)
    )
    torch.manual_seed(0)
    convs = 0
    for model in (fused_models.resnet50(num_classes=10), fused_resnet.preact_resnet164(num_classes=10)):
        randomize_bn_(model).eval()
        convs += sum(isinstance(m, nn.Conv2d) for m in model.modules())
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32) * 100)
    assert len(recorded) == convs  # every conv ran under bounds: the scans stayed off
    assert all(float(out.abs().max()) <= bound for out, bound in recorded)
    assert any(float(out.abs().max()) > 0.1 * bound for out, bound in recorded)  # the bounds are not all loose


def test_a_stock_module_between_the_convs_is_read_before_a_conv_takes_its_output():
    # A deep stem (stock modules) with a NaN statistic: the convs after it must see that NaN, though the model's
    # input is finite and its parts all known types.
    torch.manual_seed(0)
    tv = randomize_bn_(torchvision.models.resnet18(num_classes=10)).eval()
    fused = fuse(tv)
    tv.conv1 = _deep_stem().eval()
    with torch.no_grad():
        tv.conv1[1].running_var[5] = float("nan")
    fused.conv1 = copy.deepcopy(tv.conv1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = fused(x), tv(x)
    assert torch.isnan(want).all() and torch.isnan(got).all()


def test_hooks_on_relu_modules_fire_and_shape_the_gradient():
    # Guided backprop clamps the gradient in a full backward hook on every nn.ReLU (an audit found the fused model
    # running none of them: its input gradient came out wrong).
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).double().eval()
    fused = fuse(tv)
    for net in (tv, fused):
        for module in net.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
                module.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0].clamp(min=0),))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for net in (tv, fused):
        xg = x.clone().requires_grad_(True)
        net(xg)[:, 3].sum().backward()
        grads.append(xg.grad)
    assert relative_error(grads[1], grads[0]) < 1e-10


def _deep_stem() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 1, 1, bias=False)
    )


@pytest.mark.parametrize("train", [False, True])
def test_a_stem_swapped_for_a_module_that_is_no_conv_runs_as_in_torchvision(train):
    # A "deep stem" (ResNet-C/D) put in conv1's place after fusing: the model's input check asked conv1 for its
    # in_channels and raised AttributeError.
    torch.manual_seed(0)
    reference = randomize_bn_(torchvision.models.resnet18(num_classes=10)).double()
    fused = fuse(reference)
    reference.conv1 = _deep_stem().double()
    fused.conv1 = copy.deepcopy(reference.conv1)
    reference.train(train), fused.train(train)
    x = _x()
    out, want = fused(x), reference(x)
    assert relative_error(out, want) <= 1e-12
    if train:
        out.sum().backward(), want.sum().backward()
        assert relative_error(fused.conv1[0].weight.grad, reference.conv1[0].weight.grad) <= 1e-10
    with pytest.raises(RuntimeError):  # the stem's own conv refuses a wrong channel count
        fused(torch.randn(2, 4, 64, 64, dtype=torch.float64))
