"""Eval plans (fused_resnet/nn/eval_plans.py): a repeated eager eval call runs the decisions kept from the first one,
and gives exactly what the full path gives, also after whatever may have changed in between.

The oracle is the full path itself (plans switched off), run on the same operands: the plan must give the same bits.
Each test also checks that the plan was used where it may be and not where it may not, so that a plan that never
runs (or always does) cannot pass.
"""

import copy
import os

import pytest
import torch
from torch import nn

from fused_resnet import ConvBNAct, clear_caches
from fused_resnet.nn import conv_bn_act, eval_plans
from fused_resnet.ops import cpp_backend
from fused_resnet.tolerances import relative_error

pytestmark = pytest.mark.skipif(cpp_backend.unavailable("cpu") is not None, reason="the extension's CPU kernels")


class _Spy:
    """Counts plan runs that gave a result (hits) and those that did not hold (misses)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hits = self.misses = 0
        run = eval_plans.EvalPlan.run

        def counted(plan, *args):
            out = run(plan, *args)
            if out is None:
                self.misses += 1
            else:
                self.hits += 1
            return out

        monkeypatch.setattr(eval_plans.EvalPlan, "run", counted)

    def take(self) -> tuple[int, int]:
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts


@pytest.fixture
def spy(monkeypatch):
    return _Spy(monkeypatch)


def _full_path(fn, *args):
    """fn(*args) with plans off: the oracle."""
    keep, plan_of = eval_plans.keep, eval_plans.plan_of
    eval_plans.keep = lambda *a: None
    eval_plans.plan_of = lambda conv: None
    try:
        return fn(*args)
    finally:
        eval_plans.keep, eval_plans.plan_of = keep, plan_of


def _module(cin=8, cout=8, dtype=torch.float32, **kw) -> ConvBNAct:
    m = ConvBNAct(cin, cout, 3, padding=1, **kw).to(dtype).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m


def _input(n=2, c=8, h=6, w=5, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _stock(m: ConvBNAct, x, residual=None):
    y = m.bn(m.conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if m.relu else y


def _planned(spy) -> tuple[ConvBNAct, torch.Tensor]:
    """A module and an input whose second call ran a plan."""
    m, x = _module(), _input()
    with torch.no_grad():
        m(x)
        m(x)
    assert spy.take() == (1, 0)
    return m, x


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_repeated_call_runs_the_plan_and_gives_the_full_paths_bits(spy, dtype, with_residual, mode):
    m = _module(dtype=dtype)
    x = _input(dtype=dtype)
    r = _input(dtype=dtype) if with_residual else None
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        first = m(x, r)
        assert spy.take() == (0, 0)  # no plan before the first call
        again = m(x, r)
        assert spy.take() == (1, 0)
        _same(again, first)
        _same(again, _full_path(m, x, r))
        # the full path itself against the stock modules (fp64 reference)
        want = _stock(copy.deepcopy(m).double(), x.double(), None if r is None else r.double())
        assert relative_error(again.double(), want) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def _mutations():
    def running_var(m):
        m.bn.running_var.mul_(3.0)

    def bn_bias(m):
        m.bn.bias.add_(1.0)

    def new_weight(m):
        m.conv.weight = nn.Parameter(torch.randn_like(m.conv.weight))

    def swapped_storage(m):
        m.conv.weight.data = torch.randn_like(m.conv.weight)

    def eps(m):
        m.bn.eps = 0.5

    def stride(m):
        m.conv.stride = (2, 2)

    def padding(m):
        m.conv.padding = (0, 0)

    def running_mean_buffer(m):
        m.bn.running_mean = torch.full_like(m.bn.running_mean, 0.25)

    def plain_attribute_bias(m):  # a bias the conv's own forward reads: the full path runs it
        del m.conv.bias
        m.conv.bias = torch.ones(m.conv.out_channels)

    plain_attribute_bias.unfused = True  # the modules' own forwards run from then on: no plan is kept

    def load_state_dict(m):
        state = {k: v.clone() + 0.1 if v.is_floating_point() else v for k, v in m.state_dict().items()}
        m.load_state_dict(state)

    return [running_var, bn_bias, new_weight, swapped_storage, eps, stride, padding, running_mean_buffer,
            plain_attribute_bias, load_state_dict]  # fmt: skip


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_a_change_to_the_modules_is_seen(spy, mutate):
    m = _module()
    x = _input()
    with torch.no_grad():
        before = m(x)
        m(x)
        assert spy.take() == (1, 0)
        mutate(m)
        got = m(x)
        assert spy.take() == (0, 1)  # the plan did not hold: the full path ran, and made a new plan
        _same(got, _full_path(m, x))
        assert got.shape != before.shape or not torch.equal(got, before)
        reference = copy.deepcopy(m).double()
        if isinstance(reference.conv.__dict__.get("bias"), torch.Tensor):  # not a parameter: .double() leaves it
            reference.conv.bias = reference.conv.bias.double()
        assert relative_error(got.double(), _stock(reference, x.double())) < 1e-5
        _same(m(x), got)
        assert spy.take() == ((0, 1) if getattr(mutate, "unfused", False) else (1, 0))


@pytest.mark.parametrize(
    "change",
    ["shape", "batch", "layout", "dtype", "residual", "no_residual", "relu"],
)
def test_other_operands_run_the_full_path(spy, change):
    m = _module()
    x, r = _input(), _input()
    with torch.no_grad():
        m(x, r)
        m(x, r)
        assert spy.take() == (1, 0)
        args = {
            "shape": (_input(h=9, w=4), _input(h=9, w=4)),
            "batch": (_input(n=3), _input(n=3)),
            "layout": (x.contiguous(), r),
            "dtype": (x.double(), r.double()),
            "residual": (x, r + 1),  # another tensor of the same signature: the plan holds, and reads it
            "no_residual": (x, None),
        }
        if change == "dtype":
            m.double()
        if change == "relu":
            m.relu = False
            args["relu"] = (x, r)
        got = m(*args[change])
        assert spy.take() == ((1, 0) if change == "residual" else (0, 1))
        _same(got, _full_path(m, *args[change]))


def test_hooks_and_modes_that_need_the_modules_to_run(spy):
    m, x = _planned(spy)
    seen = []
    handle = m.bn.register_forward_hook(lambda *a: seen.append("bn"))
    with torch.no_grad():
        got = m(x)
        assert seen == ["bn"] and spy.take() == (0, 1)
        _same(got, _full_path(m, x))  # the modules' own forwards, both
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        with torch.no_grad():
            m(x)
    finally:
        handle.remove()
    assert nn.Conv2d in seen and spy.take()[0] == 0
    m.train()
    with torch.no_grad():
        train_out = m(x)
    m.eval()
    assert spy.take()[0] == 0
    assert not torch.equal(train_out, m(x).detach())  # batch statistics vs the running ones (moved since)


def test_autograd_and_autocast_take_the_full_path(spy):
    m, x = _planned(spy)
    xg = x.clone().requires_grad_()
    out = m(xg)  # grad mode, and a parameter wants a gradient: the full path, with autograd
    out.sum().backward()
    assert xg.grad is not None and m.conv.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16
    assert spy.take()[0] == 0


def test_an_act_that_is_no_relu_or_has_hooks_runs_itself(spy):
    conv, bn = _module().conv, _module().bn
    x = _input()
    with torch.no_grad():
        conv_bn_act(x, conv, bn, act=nn.ReLU())
        conv_bn_act(x, conv, bn, act=nn.ReLU())
        assert spy.take() == (1, 0)
        got = conv_bn_act(x, conv, bn, act=nn.GELU())
        assert spy.take() == (0, 1)
        want = nn.functional.gelu(bn(conv(x)))
        assert relative_error(got, want) < 1e-6


def test_a_prologue_call_takes_its_own_plan(spy):
    m = _module()
    pre = copy.deepcopy(m.bn)
    with torch.no_grad():
        pre.running_var.uniform_(0.5, 2.0)
    x = _input()

    def call(pre_bn=pre):
        return conv_bn_act(x, m.conv, m.bn, pre_bn=pre_bn)

    def stock(pre_bn=pre):
        return _stock(m, torch.relu(pre_bn(x)))

    with torch.no_grad():
        call()
        got = call()
        assert spy.take() == (1, 0)
        _same(got, _full_path(call))
        assert relative_error(got, stock()) < 1e-5
        got = m(x)  # the same conv without the prologue: the plan does not hold
        assert spy.take() == (0, 1)
        _same(got, _full_path(m, x))
        call()
        spy.take()
        pre.running_var.mul_(4.0)  # the prologue's statistics change: seen
        got = call()
        assert spy.take() == (0, 1)
        assert relative_error(got, stock()) < 1e-5
        other = copy.deepcopy(pre)
        got = call(other)  # another norm object
        assert spy.take() == (0, 1)
        assert relative_error(got, stock(other)) < 1e-5

        def settled():  # a plan for `pre` again
            call()
            call()
            assert spy.take()[0] >= 1

        settled()
        pre.eps = 0.5
        got = call()
        assert spy.take() == (0, 1)
        assert relative_error(got, stock()) < 1e-5
        settled()
        seen = []
        handle = pre.register_forward_hook(lambda *a: seen.append(1))
        call()
        handle.remove()
        assert seen == [1] and spy.take() == (0, 1)
        settled()
        pre.train()
        got = call()  # the prologue normalizes with the batch's statistics now
        pre.eval()
        assert spy.take() == (0, 1)
        assert not torch.equal(got, call())


def test_the_backend_is_chosen_again_where_the_request_changes(spy, monkeypatch):
    m, x = _planned(spy)
    with torch.no_grad():
        monkeypatch.setitem(os.environ, "FUSED_RESNET_BACKEND", "reference")
        got = m(x)
        assert spy.take() == (0, 1)
        assert relative_error(got.double(), _stock(copy.deepcopy(m).double(), x.double())) < 1e-5


def test_parameters_made_in_inference_mode_keep_no_plan(spy):
    with torch.inference_mode():  # inference tensors have no version counter: their fold is not cached, nor a plan
        m = _module()
    x = _input()
    with torch.inference_mode():
        m(x)
        got = m(x)
        assert spy.take() == (0, 0) and eval_plans.plan_of(m.conv) is None
        _same(got, _full_path(m, x))


def test_clear_caches_drops_the_plan_and_copies_carry_none():
    m = _module()
    x = _input()
    with torch.no_grad():
        m(x)
    assert eval_plans.plan_of(m.conv) is not None
    assert eval_plans.plan_of(copy.deepcopy(m).conv) is None
    clear_caches(m)
    assert eval_plans.plan_of(m.conv) is None


def test_a_launch_that_writes_into_a_folded_tensor_leaves_no_stale_plan(spy):
    # A donated residual that aliases BN's running_var (found by audit): the call writes its output there, so the
    # next one must fold the new statistics; the plan was keeping the state after the write.
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 1, bias=False).eval(), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        conv.weight.abs_()
        x = torch.rand(1, 8, 1, 1) + 1
        conv_bn_act(x, conv, bn, residual=bn.running_var.view(1, 8, 1, 1), relu=False, donate_residual=True)
        r = bn.running_var.view(1, 8, 1, 1).clone()
        got = conv_bn_act(x, conv, bn, residual=r.clone(), relu=False, donate_residual=True)
        assert spy.take() == (0, 1)
        _same(got, _full_path(lambda: conv_bn_act(x, conv, bn, residual=r.clone(), relu=False, donate_residual=True)))


def test_a_new_auto_order_is_followed(spy, monkeypatch):
    from dataclasses import replace

    from fused_resnet import backends

    m, x = _planned(spy)
    with torch.no_grad():
        backends.load_backends()
        reference = backends.get_backend("reference")
        calls = []

        def counted(*args):
            calls.append(1)
            return reference.conv_bias_act(*args)

        monkeypatch.setitem(backends._LOADED, "reference", replace(reference, conv_bias_act=counted, launch=counted))
        monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("reference",))
        got = m(x)
    assert calls == [1]
    assert relative_error(got.double(), _stock(copy.deepcopy(m).double(), x.double())) < 1e-5


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet164"])
def test_a_model_forward_takes_a_plan_at_every_conv(spy, name):
    import fused_resnet

    torchvision = pytest.importorskip("torchvision")
    stock = torchvision.models.resnet18().eval() if name == "resnet18" else None
    model = fused_resnet.fuse(stock) if stock is not None else fused_resnet.preact_resnet164().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model(x)
        spy.take()
        second = model(x)
        hits, misses = spy.take()
        with_plans_off = _full_path(model, x)
        want = stock(x) if stock is not None else None
    n_convs = sum(isinstance(mod, nn.Conv2d) for mod in model.modules())
    assert (hits, misses) == (n_convs, 0)  # a pre-activation net: a third of its convs have a prologue
    _same(second, first)
    _same(second, with_plans_off)
    if want is not None:
        assert relative_error(second, want) < 1e-4
