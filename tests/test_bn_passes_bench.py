"""benchmarks/bn_passes_bench.py on the CPU: every BN layer shape of the model is timed for every contender, and
the per-step totals add the layers up (on a GPU the same script measures the passes' memory bandwidth)."""

import importlib.util
import re
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bn_passes_bench.py"
_spec = importlib.util.spec_from_file_location("bn_passes_bench", _PATH)
bn_passes_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn_passes_bench)


def test_finds_every_bn_layer_shape():
    import torchvision

    shapes = bn_passes_bench.bn_input_shapes(torchvision.models.resnet18(), batch=4, size=64)
    assert sum(shapes.values()) == 20  # resnet18: bn1, 16 in the blocks, 3 downsample BNs
    assert shapes[(4, 64, 32, 32)] == 1 and shapes[(4, 64, 16, 16)] == 4
    assert all(shape[0] == 4 for shape in shapes)


def test_reports_each_pass_per_shape_and_per_step(capsys, one_thread):
    from fused_resnet.ops.cpp_backend import unavailable

    impl = "cpp" if unavailable("cpu") is None else "torch"
    args = ["--device", "cpu", "--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "1"]
    assert bn_passes_bench.main([*args, "--passes", impl]) == 0
    lines = capsys.readouterr().out.splitlines()
    shape_rows = [line for line in lines if line.strip().startswith("(2, ")]
    assert len(shape_rows) == 5  # resnet18 at 32x32: one shape per stage, plus the stem BN's
    assert all(len(re.findall(r"\d+\.\d+ ms", row)) == len(bn_passes_bench.TENSOR_PASSES) for row in shape_rows)
    per_step = {line.split()[0]: float(line.split()[1]) for line in lines if re.match(r"^  \w+ +\d+\.\d+ ms ", line)}
    assert set(per_step) == set(bn_passes_bench.TENSOR_PASSES) and all(ms > 0 for ms in per_step.values())


def test_swept_contenders_set_and_restore_rows_per_thread():
    import pytest
    import torch

    from fused_resnet.ops.cpp_backend import _C, unavailable

    if unavailable("cpu") is not None:
        pytest.skip(unavailable("cpu"))
    fns = bn_passes_bench._contenders((2, 16, 4, 4), torch.bfloat16, torch.device("cpu"), "cpp", [2, 4])
    swept = {f"{name}@{rows}" for rows in (2, 4) for name in bn_passes_bench.SWEPT}
    assert set(fns) == set(bn_passes_bench.TENSOR_PASSES) | swept
    for name in sorted(swept):
        fns[name]()
        assert _C.bn_rows_per_thread() == 1
    for bad in (0, 3, 8):  # the kernels have 1, 2 and 4 only
        with pytest.raises(ValueError, match="1, 2 or 4"):
            _C.set_bn_rows_per_thread(bad)


def test_times_the_stem_pool_where_its_kernels_run(capsys, one_thread, emulated_pool_ops_on_cpu, monkeypatch):
    # On CPU the section says why it is skipped; with the kernels (here emulated, as CPU ops) it times four rows.
    args = ["--device", "cpu", "--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "1"]
    assert bn_passes_bench.main([*args, "--passes", "cpp"]) == 0
    assert "stem max-pool (2, 64, 16, 16): not timed" in capsys.readouterr().out
    monkeypatch.setattr(bn_passes_bench, "_pool_kernels_run", lambda device, dtype: True)
    assert bn_passes_bench.main([*args, "--passes", "cpp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[lines.index(next(x for x in lines if "stem max-pool" in x)) :]}
    for name in ("pool_forward", "pool_backward", "aten_pool_forward", "aten_pool_backward"):
        assert re.search(r"\d+\.\d+ ms", rows[name]), lines[-6:]
    assert {"forward", "backward"} <= set(emulated_pool_ops_on_cpu)
