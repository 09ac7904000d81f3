"""What the fused training path keeps alive for backward, against stock PyTorch: raw conv outputs instead of
normalized or post-ReLU tensors, and recipes that remake activations and block outputs in backward."""

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from model_checks import stock_channels_last, stock_unit
from torch import nn

import fused_resnet
from fused_resnet import ConvBNAct
from fused_resnet.models._layers import StemMaxPool2d
from fused_resnet.tolerances import relative_error
from fused_resnet.training import passes
from fused_resnet.training.recipes import KEEP_EVERY, recipe_of


def _saved(fn) -> tuple[torch.Tensor, dict[int, int]]:
    """fn()'s output and what its autograd graph keeps for backward: {storage pointer: bytes}, read from the graph's
    nodes (saved-tensor hooks would turn the recipes off). Checked against hooks on stock torchvision: the same."""
    out = fn()
    saved, seen, stack = {}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = list(getattr(node, "saved_tensors", None) or ())  # custom Functions
        for name in dir(node):  # built-in nodes: _saved_self, _saved_weight, _saved_indices, ...
            if name.startswith("_saved_"):
                value = getattr(node, name)
                tensors += value if isinstance(value, (list, tuple)) else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return out, saved


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_backward_saves_raw_conv_output_not_normalized_or_activation(backend, monkeypatch):
    m = ConvBNAct(8, 8, 3, padding=1, backend=backend).train()
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    ys = []
    monkeypatch.setattr(F, "conv2d", lambda *a, _conv=F.conv2d: ys.append(_conv(*a)) or ys[-1])
    out, saved = _saved(lambda: m(x))
    (y,) = ys
    activations = {t.untyped_storage().data_ptr() for t in (x, y)}
    others = {p: n for p, n in saved.items() if p not in activations}
    if backend == "reference":  # stock PyTorch also keeps the ReLU's output alive
        assert out.untyped_storage().data_ptr() in saved
    else:
        # x, y, and otherwise only the weight and per-channel vectors (mean, invstd, γ, β).
        assert activations <= saved.keys()
        assert max(others.values()) <= m.conv.weight.untyped_storage().nbytes()
        assert sum(others.values()) < out.untyped_storage().nbytes()


def _activation_storages(saved: dict[int, int], model: nn.Module) -> dict[int, int]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return {ptr: n for ptr, n in saved.items() if ptr not in params and n > 4096}  # not weights or vectors


def test_an_inner_activation_is_remade_not_kept():
    # out1 = relu(bn1(conv1(x))) feeds only conv2: conv2 keeps out1's recipe (y1, already kept, and two vectors).
    m1, m2 = (ConvBNAct(8, 8, 3, padding=1).train() for _ in range(2))
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    outs = []
    out, saved = _saved(lambda: m2(outs.append(m1(x)) or outs[0]))
    assert outs[0].untyped_storage().data_ptr() not in saved
    # ... and the gradients are those of stock modules.
    plain = [copy.deepcopy(m) for m in (m1, m2)]
    want = stock_unit(plain[1], stock_unit(plain[0], x))
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(out, [x, m1.conv.weight, m2.conv.weight], g)
    want_g = torch.autograd.grad(want, [x, plain[0].conv.weight, plain[1].conv.weight], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-5


def test_a_projection_shortcut_is_remade_not_kept():
    proj = ConvBNAct(8, 8, 1, relu=False).train()
    main = ConvBNAct(8, 8, 3, padding=1).train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    shortcuts = []
    _, saved = _saved(lambda: main(x, shortcuts.append(proj(x)) or shortcuts[0]))
    assert shortcuts[0].untyped_storage().data_ptr() not in saved


def test_an_activation_changed_in_place_is_kept_as_it_is():
    m1, m2 = (ConvBNAct(4, 4, 3, padding=1).train().double() for _ in range(2))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    plain = [copy.deepcopy(m) for m in (m1, m2)]
    got = m2(m1(x).mul_(2.0))  # the recipe no longer describes the tensor: conv2 must keep the tensor
    want = stock_unit(plain[1], stock_unit(plain[0], x) * 2.0)  # stock keeps the ReLU output: no in-place there
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [x, m2.conv.weight], g)
    want_g = torch.autograd.grad(want, [x, plain[1].conv.weight], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-10


def _residual_chain(units: list[ConvBNAct], x: torch.Tensor, outs: list) -> torch.Tensor:
    """out_k = relu(bn(conv(out_k-1)) + out_k-1), each out kept in `outs`: a stage of identity blocks, shortened."""
    h = x
    for unit in units:
        h = unit(h, h)
        outs.append(h)
    return h


def test_block_outputs_are_remade_through_a_chain_of_recipes():
    # out_k's recipe refers to out_k-1's: backward remakes each block output from the raw conv outputs; only every
    # KEEP_EVERY-th one is kept as it is (the end of a chain).
    units = [ConvBNAct(4, 4, 3, padding=1).train().double() for _ in range(2 * KEEP_EVERY + 2)]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    outs = []
    out, saved = _saved(lambda: _residual_chain(units, x, outs))
    kept = [o.untyped_storage().data_ptr() in saved for o in outs[:-1]]
    assert kept == [(k + 1) % KEEP_EVERY == 0 for k in range(len(outs) - 1)]
    plain = copy.deepcopy(units)
    want = x
    for unit in plain:
        want = stock_unit(unit, want, want)
    g = torch.randn_like(want)
    params = [p for u in units for p in u.parameters()]
    got_g = torch.autograd.grad(out, [x, *params], g)
    want_g = torch.autograd.grad(want, [x, *(p for u in plain for p in u.parameters())], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-10


def _counting_normalize(monkeypatch) -> list[int]:
    calls = []
    for name, impl in list(passes.PASSES.items()):

        def normalize(*args, _normalize=impl.normalize):
            calls.append(1)
            return _normalize(*args)

        monkeypatch.setitem(passes.PASSES, name, dataclasses.replace(impl, normalize=normalize))
    return calls


def test_each_remade_tensor_is_made_once_and_dropped_after_its_last_use(monkeypatch):
    units = [ConvBNAct(4, 4, 3, padding=1).train().double() for _ in range(KEEP_EVERY + 2)]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    outs = []
    out = _residual_chain(units, x, outs)
    made = [r for r in map(recipe_of, outs) if r is not None]
    assert len(made) == len(outs) - 1  # outs[KEEP_EVERY - 1] has none: it ends a chain
    calls = _counting_normalize(monkeypatch)
    (grad_first,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    # outs[:-1] are consumed by the next unit; outs[KEEP_EVERY - 1] is kept: the others are remade, once each.
    assert len(calls) == len(outs) - 2
    # Each unit's backward released its output's recipe: no tensor is held for it any more, and a new graph would
    # keep the outputs themselves.
    assert all(r.y is None and r.residual is None and r.memo.tensor is None for r in made)
    assert all(recipe_of(o) is None for o in outs)
    # A second backward over the retained graph remakes them again from its own saved tensors: the same gradient.
    (grad_second,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad_first, grad_second)


def test_no_recipes_without_a_graph_or_under_saved_tensor_hooks():
    unit = ConvBNAct(4, 4, 3, padding=1).train()
    x = torch.randn(2, 4, 6, 6)
    assert recipe_of(unit(x)) is not None  # the unit's parameters require grad: it keeps y for its backward
    unit.requires_grad_(False)
    assert recipe_of(unit(x)) is None  # no graph: nothing keeps y, a recipe would cost memory
    unit.requires_grad_(True)
    with torch.autograd.graph.save_on_cpu():
        assert recipe_of(unit(x)) is None


def test_a_chain_cut_by_an_in_place_change_keeps_the_changed_tensor():
    units = [ConvBNAct(4, 4, 3, padding=1).train().double() for _ in range(3)]
    plain = copy.deepcopy(units)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    h = units[0](x, x)
    h = units[1](h, h).mul_(0.5)  # its recipe no longer describes it
    got = units[2](h, h)
    want = stock_unit(plain[0], x, x)
    want = stock_unit(plain[1], want, want) * 0.5
    want = stock_unit(plain[2], want, want)
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [x, units[0].conv.weight], g)
    want_g = torch.autograd.grad(want, [x, plain[0].conv.weight], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-10


def test_the_stem_pool_keeps_neither_its_input_nor_the_indices():
    stem, pool = ConvBNAct(3, 8, 7, stride=2, padding=3).train().double(), StemMaxPool2d(3, 2, 1)
    stock_stem, stock_pool = copy.deepcopy(stem), nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 21, 21, dtype=torch.float64, requires_grad=True)
    activations = []
    got, saved = _saved(lambda: pool(activations.append(stem(x)) or activations[0]))
    assert activations[0].untyped_storage().data_ptr() not in saved
    inputs = {t.untyped_storage().data_ptr() for t in (x, stem.conv.weight)}
    larger_than_vectors = [n for p, n in saved.items() if p not in inputs and n > 8 * 8]
    assert larger_than_vectors == [activations[0].untyped_storage().nbytes()]  # the stem's y: no input, no indices
    want = stock_pool(stock_unit(stock_stem, x))
    assert relative_error(got, want) < 1e-12
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [x, stem.conv.weight, stem.bn.weight], g)
    want_g = torch.autograd.grad(want, [x, stock_stem.conv.weight, stock_stem.bn.weight], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-10


def test_the_stem_pool_runs_its_hooks_and_pools_anything_else_as_stock():
    pool, seen = StemMaxPool2d(3, 2, 1), []
    pool.register_forward_hook(lambda m, args, out: seen.append(out))
    x = torch.randn(2, 4, 9, 9, requires_grad=True)  # no recipe: the stock pool
    out = pool(x)
    assert seen and seen[0] is out and torch.equal(out, F.max_pool2d(x, 3, 2, 1))
    unit = ConvBNAct(3, 4, 3, padding=1).train()
    out = pool(unit(torch.randn(2, 3, 9, 9)))  # a recipe: the remaking pool, hooks still run
    assert seen[1] is out


@pytest.mark.parametrize("arch, bound", [("resnet18", 0.56), ("resnet50", 0.64)])
def test_fused_resnets_keep_less_for_backward_than_torchvision(arch, bound):
    # Per bottleneck torchvision keeps x, y1, out1, y2, out2, y3 and the block output (the next block's x): 12w in
    # units of the inner width w. The fused blocks keep y1, y2, y3 (6w), remake out1 and out2 from them, and remake
    # the block output from y3 and the previous block's output (kept every KEEP_EVERY blocks); the stem keeps its
    # raw conv output only (the max-pool remakes its input). Measured at 2x64x64: ResNet-18 0.51, ResNet-50 0.60.
    tv = getattr(torchvision.models, arch)(num_classes=10).train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    stock_model = stock_channels_last(tv)
    fused = fused_resnet.fuse(tv)
    stock = sum(_activation_storages(_saved(lambda: stock_model(x))[1], stock_model).values())
    ours = sum(_activation_storages(_saved(lambda: fused(x))[1], fused).values())
    assert ours <= bound * stock, ours / stock


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("under_hooks", [False, True], ids=["plain", "save_on_cpu"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_over_fused_stages_gives_the_same_gradients(reentrant, under_hooks):
    # torch.utils.checkpoint reruns the stages' forward in backward, which must save what the first forward saved;
    # under saved-tensor hooks (save_on_cpu) the recomputation sees other tensor objects than the first forward.
    fused = fused_resnet.fuse(torchvision.models.resnet18(num_classes=10).double().train())
    checkpointed = copy.deepcopy(fused)
    for name in ("layer2", "layer3"):
        setattr(checkpointed, name, _Checkpointed(getattr(checkpointed, name), reentrant))
    grads = []
    for model in (fused, checkpointed):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0].replace(".inner", ""))]
        with torch.autograd.graph.save_on_cpu() if under_hooks else contextlib.nullcontext():
            model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params] + [x.grad.flatten()]))
    assert torch.equal(grads[0], grads[1])
