"""ConvBNAct / conv_bn_act against plain nn.Conv2d → nn.BatchNorm2d → (+ residual) → ReLU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet import ConvBNAct
from fused_resnet.nn import bn_act, conv_bn_act
from fused_resnet.nn.folding import cached_fold, clear_caches
from fused_resnet.tolerances import relative_error


def _randomize(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return bn


def _module(cin=8, cout=16, k=3, **kw) -> ConvBNAct:
    m = ConvBNAct(cin, cout, k, padding=k // 2, **kw).double()
    _randomize(m.bn)
    return m


def _plain(m: ConvBNAct, x, residual=None):
    y = m.bn(m.conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if m.relu else y


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_plain_modules(relu, with_residual, training):
    fused = _module(relu=relu).train(training)
    plain = copy.deepcopy(fused)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True) if with_residual else None
    got, want = fused(x, r), _plain(plain, x, r)
    assert relative_error(got, want) < 1e-12
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, fused.conv.weight, fused.bn.weight, fused.bn.bias], g)
    want_grads = torch.autograd.grad(want, [x, plain.conv.weight, plain.bn.weight, plain.bn.bias], g)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert relative_error(a, b) < 1e-10
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(fused.bn, name), getattr(plain.bn, name), rtol=1e-12, atol=0), name


@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (16, 1, 1), (2, 1, 9, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_a_residual_that_broadcasts(shape, training):
    # `y + residual` broadcasts (stock, and the train path); eval refused it (an audit).
    fused = _module().train(training)
    plain = copy.deepcopy(fused)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    r = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    got, want = fused(x, r), _plain(plain, x, r)
    assert relative_error(got, want) < 1e-12
    g = torch.randn_like(want)
    assert relative_error(torch.autograd.grad(got, r, g)[0], torch.autograd.grad(want, r, g)[0]) < 1e-10
    with torch.no_grad():
        assert relative_error(fused(x, r), want) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_follow_batchnorm_over_steps(momentum):
    fused = _module(momentum=momentum).train()
    plain = copy.deepcopy(fused)
    for _ in range(3):
        x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
        fused(x)
        _plain(plain, x)
    assert int(fused.bn.num_batches_tracked) == 3
    assert torch.allclose(fused.bn.running_mean, plain.bn.running_mean, rtol=1e-12, atol=1e-15)
    assert torch.allclose(fused.bn.running_var, plain.bn.running_var, rtol=1e-12, atol=1e-15)


def test_affine_false_and_no_running_stats():
    for kwargs in ({"affine": False}, {"track_running_stats": False}):
        conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
        bn = _randomize(nn.BatchNorm2d(6, **kwargs).double())
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        for training in (True, False):
            bn.train(training)
            plain_bn = copy.deepcopy(bn)
            got = conv_bn_act(x, conv, bn)
            want = torch.relu(plain_bn(conv(x)))
            assert relative_error(got, want) < 1e-12, (kwargs, training)


def test_num_batches_tracked_counts_without_running_buffers():
    # Code that sets the running buffers to None (batch statistics always) keeps track_running_stats and the counter,
    # which stock then still counts (an audit found it left at 0).
    m = _module()
    m.bn.running_mean = m.bn.running_var = None
    stock = copy.deepcopy(m)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    for _ in range(3):
        assert relative_error(m(x), _plain(stock, x)) < 1e-12
    assert m.bn.num_batches_tracked.item() == stock.bn.num_batches_tracked.item() == 3


def test_eval_fold_is_cached_and_invalidated():
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y0 = m(x)
        first = cached_fold(m.conv)[0]
        assert torch.equal(m(x), y0)
        assert cached_fold(m.conv)[0] is first  # reused
        # load_state_dict changes the values in place (bumps version counters): the fold must follow.
        other = _module().eval()
        m.load_state_dict(other.state_dict())
        assert relative_error(m(x), _plain(other, x)) < 1e-12
        # An optimizer-style in-place update.
        m.bn.weight.mul_(2)
        assert relative_error(m(x), _plain(m, x)) < 1e-12
        # .to() moves/retypes the tensors.
        m.float()
        assert relative_error(m(x.float()), _plain(m, x.float())) < 1e-6
        m.double()
    # A mode switch: train uses batch statistics, eval again the (now updated) running ones.
    m.train()
    m(x)
    m.eval()
    with torch.no_grad():
        assert relative_error(m(x), _plain(m, x)) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eval_fold_follows_a_train_forward_of_the_bn_module_itself(backend):
    # Stock BN's train forward (BN recalibration; here the reference backend's training, or a BN with a hook, which
    # runs its own forward) moves the running statistics inside ATen's kernel, which bumps no version counter: an
    # audit found the fold cached before it still in use after (2.6 off on a 3.8-scale output).
    m = _module()
    m.backend = backend
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        m(x)
        assert cached_fold(m.conv) is not None
        handle = m.bn.register_forward_hook(lambda *args: None)  # the cpu backend's own training is the fused one
        m.train()
        m(x * 3 + 1)
        handle.remove()
        m.eval()
        assert relative_error(m(x), _plain(m, x)) < 1e-12


def test_the_fold_cache_is_neither_saved_nor_copied(tmp_path):
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    before = tmp_path / "before.pt"
    torch.save(m, before)
    with torch.no_grad():
        y = m(x)
    after = tmp_path / "after.pt"
    torch.save(m, after)
    # The fold (and its aliases of the parameters) would double the file.
    assert after.stat().st_size < before.stat().st_size * 1.05
    for other in (torch.load(after, weights_only=False), copy.deepcopy(m)):
        assert cached_fold(other.conv) is None
        with torch.no_grad():
            assert torch.equal(other(x), y)


def test_eval_fold_follows_a_replaced_parameter():
    # A new parameter may be made where a freed one was, its version counter at 0 again: the cache must not take
    # it for the one it folded (a replacement after a `del`, or two replacements between calls).
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(8):
            m(x)
            del m.conv.weight
            m.conv.weight = nn.Parameter(torch.randn(16, 8, 3, 3, dtype=torch.float64))
            assert relative_error(m(x), _plain(m, x)) < 1e-12
            m.bn.weight = nn.Parameter(torch.rand(16, dtype=torch.float64) + 0.5)
            m.bn.weight = nn.Parameter(torch.rand(16, dtype=torch.float64) + 0.5)
            assert relative_error(m(x), _plain(m, x)) < 1e-12


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factor


def test_eval_reads_parametrized_weights():
    # A parametrization makes `weight` a property of the module's class, computed at each access: the fold must
    # read it (not the stored original) and follow a change of the parametrization's own parameters.
    from torch.nn.utils import parametrize

    m = _module().eval()
    parametrize.register_parametrization(m.conv, "weight", _Scaled())
    parametrize.register_parametrization(m.bn, "weight", _Scaled())
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        m.bn.parametrizations.weight[0].factor.fill_(0.5)
        for factor in (3.0, -2.0, 0.25, 7.0, -1.0, 3.0):
            m.conv.parametrizations.weight[0].factor.fill_(factor)
            assert relative_error(m(x), _plain(m, x)) < 1e-12


def test_eval_reads_a_weight_set_as_a_plain_attribute():
    # The older reparametrizations (torch.nn.utils.weight_norm) delete the parameter and set `weight` as a plain
    # attribute before each forward.
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    weight = m.conv.weight.detach().clone()
    del m.conv.weight
    m.conv.weight = weight * 2
    with torch.no_grad():
        assert relative_error(m(x), _plain(m, x)) < 1e-12
        m.conv.weight = weight * -1
        assert relative_error(m(x), _plain(m, x)) < 1e-12


def test_eval_fold_follows_a_parameter_whose_storage_is_swapped():
    # `p.data = t` keeps the object and its version counter; two such swaps between calls could bring a new storage
    # to the folded one's address (found by an audit: wrong results from the third call on).
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    weight = m.conv.weight
    new = [torch.randn_like(weight) for _ in range(3)]
    with torch.no_grad():
        for i in range(9):
            weight.data = new[i % 3].clone()
            assert relative_error(m(x), _plain(m, x)) < 1e-12
            weight.data = weight.data.clone()


def test_a_conv_without_bn_never_hands_its_parameter_to_a_cache():
    # Without a BN the fold is the weight itself: it must be a copy, so that dropping the fold drops everything
    # cached from it (the CPU backend's prepacked weights were keyed on the user's parameter).
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False).to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        conv_bn_act(x, conv, None, relu=False)
        assert cached_fold(conv)[0].data_ptr() != conv.weight.data_ptr()
        conv.weight.data.mul_(-1)  # a write no version counter sees
        clear_caches(conv)
        assert relative_error(conv_bn_act(x, conv, None, relu=False), F.conv2d(x, conv.weight, padding=1)) < 1e-6


def test_clear_caches_after_writes_through_data():
    # An EMA model updated through `.data` (no version counter moves): documented, and clear_caches is the remedy.
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        m.conv.weight.data.mul_(0.5)
        clear_caches(m)
        assert relative_error(m(x), _plain(m, x)) < 1e-12


def test_swapping_conversions_and_assigned_state_dicts():
    # torch.utils.swap_tensors (module.to() in swap mode, load_state_dict(assign=True) there) refuses tensors with
    # weak references: the cache must hold none.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m = _module().eval()
        x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(3):
                m(x)
                state = {k: v + 0.25 if v.is_floating_point() else v for k, v in m.state_dict().items()}
                m.load_state_dict(state, assign=True)
                assert relative_error(m(x), _plain(m, x)) < 1e-12
            m.float()
            assert relative_error(m(x.float()), _plain(m, x.float())) < 1e-6
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm", "prune"])
def test_weights_made_in_a_conv_forward_pre_hook(reparametrize):
    # weight_norm, spectral_norm and pruning recompute the conv's weight in its forward pre-hook: the call must run
    # the conv's own forward (an audit found the fused path folding a stale weight).
    import warnings

    from torch.nn.utils import prune

    m = _module().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated in favour of parametrizations
        if reparametrize == "weight_norm":
            torch.nn.utils.weight_norm(m.conv)
        elif reparametrize == "spectral_norm":
            torch.nn.utils.spectral_norm(m.conv)
        else:
            prune.random_unstructured(m.conv, "weight", amount=0.5)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        for p in m.conv.parameters():
            p.mul_(3.0)
        got = m(x)  # first: the pre-hook has not run since the change
        assert relative_error(got, _plain(m, x)) < 1e-12


def test_hooks_on_the_conv_and_bn_fire():
    m = _module().eval()
    seen = []
    m.conv.register_forward_hook(lambda module, args, out: seen.append("conv"))
    m.bn.register_forward_pre_hook(lambda module, args: seen.append("bn"))
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        got = m(x)
        assert seen == ["conv", "bn"]
        assert relative_error(got, _plain(m, x)) < 1e-12


def test_global_module_hooks_see_the_conv_and_bn():
    m = _module().eval()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        with torch.no_grad():
            got = m(torch.ones(1, 8, 6, 6, dtype=torch.float64))
    finally:
        handle.remove()
    assert nn.Conv2d in seen and nn.BatchNorm2d in seen
    with torch.no_grad():
        assert relative_error(got, _plain(m, torch.ones(1, 8, 6, 6, dtype=torch.float64))) < 1e-12


class _ShiftedBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


@pytest.mark.parametrize("training", [False, True])
def test_a_batchnorm_subclass_runs_its_own_forward(training):
    m = _module().train(training)
    shifted = _ShiftedBN(16).double().train(training)
    shifted.load_state_dict(m.bn.state_dict())
    m.bn = shifted
    plain = copy.deepcopy(m)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert relative_error(m(x), _plain(plain, x)) < 1e-12


def test_jit_trace_after_an_eager_call_keeps_following_the_weights():
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        m(x)  # the fold is cached
        traced = torch.jit.trace(m, x)
        state = {k: v + 0.5 if v.is_floating_point() else v for k, v in m.state_dict().items()}
        traced.load_state_dict(state)
        m.load_state_dict(state)
        assert relative_error(traced(x), _plain(m, x)) < 1e-12


def test_inference_mode_works_and_does_not_poison_the_cache():
    m = _module().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.inference_mode():
        y = m(x)
    assert relative_error(y, _plain(m, x)) < 1e-12
    # The fold is an ordinary tensor even when made under inference_mode: reusable outside it, and cacheable by
    # backends that key on version counters.
    folded_weight = cached_fold(m.conv)[0]
    assert not folded_weight.is_inference()
    # A fold cached inside inference_mode must not leak into autograd outside it.
    xg = x.clone().requires_grad_(True)
    m.requires_grad_(False)
    m(xg).sum().backward()
    assert xg.grad is not None
    # A module created inside inference_mode has no version counters: it is never cached, still correct.
    with torch.inference_mode():
        n = _module().eval()
        assert relative_error(n(x), _plain(n, x)) < 1e-12
        assert relative_error(n(x), _plain(n, x)) < 1e-12


def test_frozen_bn_fine_tuning_gradients_reach_conv_and_bn():
    fused = _module().eval()
    plain = copy.deepcopy(fused)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    got, want = fused(x), _plain(plain, x)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, fused.conv.weight, fused.bn.weight, fused.bn.bias], g)
    want_grads = torch.autograd.grad(want, [x, plain.conv.weight, plain.bn.weight, plain.bn.bias], g)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert relative_error(a, b) < 1e-10


def test_conv_without_bn_is_cached_too():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        y = conv_bn_act(x, conv, None, relu=False)
        first = cached_fold(conv)[0]
        conv_bn_act(x, conv, None, relu=False)
        assert cached_fold(conv)[0] is first
        conv.weight.mul_(2)
        assert relative_error(conv_bn_act(x, conv, None, relu=False), 2 * y) < 1e-6


def test_pre_bn_prologue_and_no_bn():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).double()
    pre, post = _randomize(nn.BatchNorm2d(8).double()), _randomize(nn.BatchNorm2d(16).double())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    r = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for training in (False, True):
        pre.train(training)
        post.train(training)
        a, b = copy.deepcopy(pre), copy.deepcopy(post)
        got = conv_bn_act(x, conv, post, r, relu=True, pre_bn=pre)
        want = torch.relu(b(conv(torch.relu(a(x)))) + r)
        assert relative_error(got, want) < 1e-12
        got = conv_bn_act(x, conv, None, r, relu=False, pre_bn=pre)
        assert relative_error(got, conv(torch.relu(pre(x))) + r) < 1e-12
    pre.eval()
    assert relative_error(bn_act(x, pre), torch.relu(pre(x))) < 1e-12


def test_autocast_runs_in_the_autocast_dtype():
    m = ConvBNAct(8, 16, 3, padding=1).eval()
    _randomize(m.bn)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        want = torch.relu(F.batch_norm(m.conv(x), m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias))
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), want.float()) < 2e-2


class _DoubledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(8, 16, 3, padding=1, bias=True),
        lambda: nn.Conv2d(8, 16, 3, padding=1, bias=False, padding_mode="reflect"),
        lambda: nn.Conv2d(8, 16, 3, padding="same", bias=False),
        lambda: _DoubledConv(8, 16, 3, padding=1, bias=False),
    ],
    ids=["bias", "reflect", "same", "subclass"],
)
@pytest.mark.parametrize("training", [False, True])
def test_convs_the_kernels_do_not_take_run_themselves(make, training):
    # A conv set on a fused model after it was built (an audit: a Conv2d subclass with its own forward was silently
    # run as a plain conv, 2.6 off on a 6.4 scale; a bias or a reflect padding raised where stock runs).
    torch.manual_seed(0)
    m = _module()
    m.conv = make().double()
    m.train(training)
    stock = copy.deepcopy(m)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    r = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    assert relative_error(m(x, r), _plain(stock, x, r)) < 1e-12
    if training:
        assert relative_error(m.bn.running_mean, stock.bn.running_mean) < 1e-12


@pytest.mark.parametrize("training", [False, True])
def test_autocast_leaves_a_float64_module_in_float64(training):
    m = _module().train(training)
    stock = copy.deepcopy(m)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), _plain(stock, x)
    assert got.dtype == want.dtype == torch.float64
    assert relative_error(got, want) < 1e-12


def test_errors_name_the_problem():
    m = _module()
    with pytest.raises(TypeError, match="does not match"):
        m(torch.randn(1, 8, 4, 4))  # float32 input, float64 parameters
    with pytest.raises(ValueError, match="8 channels"):
        m(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual must have the output shape"):
        m.eval()(torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 16, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="too small"):
        m.eval()(torch.randn(1, 8, 0, 4, dtype=torch.float64))


def test_a_residual_changed_in_place_after_use_is_not_remade_from():
    # The unit after a residual unit remakes its input from a recipe that names the residual: changed in place
    # since, it must not be used (an audit found autograd.grad then off by 2.8 relative on a conv weight).
    def stock(m, x, r=None):
        y = m.bn(m.conv(x))
        return torch.relu(y if r is None else y + r)

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    r0 = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = {}
    for kind in ("stock", "fused"):
        torch.manual_seed(0)
        a1, a2 = (ConvBNAct(4, 4, 3, padding=1).double() for _ in range(2))
        run = stock if kind == "stock" else (lambda m, x, r=None: m(x, r))
        r = r0.clone()
        out = run(a1, x, r)
        r.add_(5.0)  # a buffer reused after the call
        z = run(a2, out)
        loss = (z * torch.arange(z.numel(), dtype=z.dtype).view_as(z).sin()).sum()
        grads[kind] = torch.autograd.grad(loss, [a2.conv.weight, a2.bn.weight])
    for got, want in zip(grads["fused"], grads["stock"], strict=True):
        assert relative_error(got, want) < 1e-10


def test_submodules_lists_what_modules_yields():
    from fused_resnet.nn.hooks import submodules

    shared = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(shared, nn.Sequential(shared, nn.ReLU(), nn.Sequential()), _module())
    model.add_module("absent", None)
    got = submodules(model)
    assert len(got) == len({id(m) for m in got})
    assert {id(m) for m in got} == {id(m) for m in model.modules()}
    assert got[0] is model


def test_a_bn_without_num_batches_tracked_is_folded_again_after_its_own_train_forward():
    # Its running statistics move inside ATen's kernel, which bumps no version counter (found by audit).
    m = _module().eval()
    m.bn.num_batches_tracked = None
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        m.bn.train()
        m.bn(m.conv(x) * 3 + 1)  # stock BN recalibration: momentum 0.1, no count
        m.bn.eval()
        got = m(x)
        assert relative_error(got, _plain(m, x)) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_kept_as_plain_attributes_move_as_stock(momentum):
    # Buffers turned into plain attributes: the fused path reads them as nn.BatchNorm2d does (found by audit: after a
    # host-time change it read the buffer dict only, and the statistics stopped moving).
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(4, momentum=momentum).double().train()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        object.__setattr__(bn, name, bn._buffers.pop(name))
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(2):
        conv_bn_act(x, conv, bn).sum().backward()
        torch.relu(bn2(conv2(x))).sum().backward()
    assert bn.num_batches_tracked.item() == bn2.num_batches_tracked.item() == 2
    assert torch.allclose(bn.running_mean, bn2.running_mean, rtol=1e-12, atol=0)
    assert torch.allclose(bn.running_var, bn2.running_var, rtol=1e-12, atol=0)


def test_the_cuda_finalize_refuses_plain_attribute_statistics_of_another_dtype():
    from fused_resnet.training import cpp_passes

    bn = nn.BatchNorm2d(4)
    y = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert cpp_passes.finalize_applies(y, bn, bn.weight, bn.bias, device_type="cpu")
    object.__setattr__(bn, "running_var", bn._buffers.pop("running_var").double())
    assert not cpp_passes.finalize_applies(y, bn, bn.weight, bn.bias, device_type="cpu")
