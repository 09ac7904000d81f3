"""benchmarks/profile_step.py on the CPU: it runs every contender and reports each (on a GPU it adds kernel time)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from fused_resnet import fuse

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_reports_every_contender(mode, capsys, one_thread):
    args = ["--device", "cpu", "--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--mode", mode]
    assert profile_step.main([*args, "--backends", "cpu", "reference"]) == 0
    out = capsys.readouterr().out
    for name in ("stock_cl", "fused:cpu", "fused:reference"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert "wall" in line and "FAILED" not in line


def test_a_backend_name_may_carry_the_cuda_engine():
    nets = profile_step._contenders(torchvision.models.resnet18(), torch.device("cpu"), ["reference+mma"])
    assert nets["stock_cl"][1] is None
    net, engine = nets["fused:reference+mma"]
    fused_units = [m for m in net.modules() if hasattr(m, "backend")]
    assert engine == "mma" and fused_units and all(m.backend == "reference" for m in fused_units)


def test_kernels_are_told_apart_by_name():
    kind = profile_step.kernel_kind
    assert kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64") == "conv/gemm"
    assert kind("void cutlass::device_kernel<fused_resnet::cuda::(anonymous namespace)::ConvKernel>") == "conv/gemm"
    assert kind("void fused_resnet::cuda::(anonymous namespace)::conv_bias_act_kernel<Cfg>") == "conv/gemm"
    assert kind("void fused_resnet::cuda::(anonymous namespace)::normalize_vec_kernel<__nv_bfloat16>") == "fused_resnet"
    assert kind("triton_poi_fused_convolution_backward_relu_threshold_backward_12") == "inductor"
    assert kind("triton_red_fused__native_batch_norm_legit_functional_3") == "inductor"
    assert kind("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<float>>") == "aten"
    assert kind("Memset (Device)") == "other"


def test_host_profile_gives_this_packages_files_and_the_ops(one_thread):
    net = fuse(torchvision.models.resnet18(), backend="cpu").train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    calls = []

    def step():
        calls.append(1)
        net(x).sum().backward()

    by_file, by_function = profile_step.host_profile(step, torch.device("cpu"), steps=2)
    assert len(calls) == 3  # one step outside the profile, then the profiled ones
    files = {where for _, _, where in by_file}
    assert "built-ins" in files and "fused_resnet/training/conv_bn_act_train.py" in files
    assert all(ms >= 0 for ms, _, _ in by_file) and by_file == sorted(by_file, reverse=True)
    assert any(where.startswith("fused_resnet/training/conv_bn_act_train.py:") for _, _, where in by_function)
