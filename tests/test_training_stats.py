"""fused_resnet.training.stats against torch.var_mean (fp64) and nn.BatchNorm2d's running-stat update."""

import copy

import pytest
import torch
from torch import nn

from fused_resnet.training.stats import BatchStats, batch_stats, chunk_stats, finalize, merge_partials


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_stats_match_var_mean(dtype, channels_last):
    y = (torch.randn(3, 5, 7, 6, dtype=torch.float64) * 2 + 1).to(dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    stats = batch_stats(y)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    # bf16/fp32 inputs accumulate in fp32: a few fp32 ulps over 126 values.
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert torch.equal(stats.count, torch.full((5,), 126.0, dtype=stats.count.dtype))
    torch.testing.assert_close(stats.mean.double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close((stats.m2 / 126).double(), var, rtol=tol, atol=tol)


def test_merge_is_exact_for_any_split_and_unequal_counts():
    y = torch.randn(40, 3, dtype=torch.float64) * 3 + 7
    splits = (1, 4, 10, 25)  # unequal parts, including a single value (M2 = 0)
    parts = torch.split(y, splits)
    stats = BatchStats(
        torch.tensor([[float(len(p))] * 3 for p in parts], dtype=torch.float64),
        torch.stack([p.mean(0) for p in parts]),
        torch.stack([(p - p.mean(0)).square().sum(0) for p in parts]),
    )
    merged = merge_partials(stats)
    torch.testing.assert_close(merged.mean, y.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.m2, (y - y.mean(0)).square().sum(0), rtol=1e-13, atol=0)
    # Merging in two levels (as SyncBN does after the per-chunk merge) gives the same result.
    halves = [merge_partials(BatchStats(*(t[i : i + 2] for t in stats))) for i in (0, 2)]
    two_level = merge_partials(BatchStats(*(torch.stack(t) for t in zip(*halves, strict=True))))
    for a, b in zip(two_level, merged, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_no_catastrophic_cancellation_in_fp32():
    # mean/std = 1e4: Σx²/n − mean² in fp32 loses every digit of the variance; Chan/two-pass does not.
    y = (1e4 + 1.0 * torch.randn(4, 2, 16, 16, dtype=torch.float64)).float()
    want = torch.var(y.double(), dim=(0, 2, 3), correction=0)
    got = batch_stats(y).m2.double() / y[:, 0].numel()
    assert ((got - want).abs() / want).max() < 1e-3
    naive = y.square().mean(dim=(0, 2, 3)) - y.mean(dim=(0, 2, 3)).square()
    assert ((naive.double() - want).abs() / want).max() > 1e-1  # the trap this design avoids


def test_chunk_stats_are_per_image():
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    stats = chunk_stats(y)
    assert stats.mean.shape == (2, 3)
    torch.testing.assert_close(stats.mean, y.mean(dim=(2, 3)))


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_finalize_updates_running_stats_like_batchnorm(momentum):
    bn = nn.BatchNorm2d(4, momentum=momentum).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    plain = copy.deepcopy(bn)
    for _ in range(3):
        y = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 + 2
        mean, invstd = finalize(batch_stats(y), bn)
        want = plain(y)
        torch.testing.assert_close(
            (y - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1), want, rtol=1e-12, atol=1e-12
        )
    assert int(bn.num_batches_tracked) == int(plain.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, plain.running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bn.running_var, plain.running_var, rtol=1e-12, atol=1e-15)


def test_finalize_leaves_untracked_and_eval_bn_alone():
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    untracked = nn.BatchNorm2d(3, track_running_stats=False).double()
    finalize(batch_stats(y), untracked)
    assert untracked.running_mean is None
    bn = nn.BatchNorm2d(3).double().eval()
    before = copy.deepcopy(bn.state_dict())
    finalize(batch_stats(y), bn)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_finalize_refuses_a_single_value_per_channel_like_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        finalize(batch_stats(torch.randn(1, 3, 1, 1)), nn.BatchNorm2d(3))
