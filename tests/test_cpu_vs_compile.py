"""benchmarks/cpu_vs_compile.py runs on a tiny model (torch.compile stubbed: its real compile is a minute here)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_vs_compile.py"
_spec = importlib.util.spec_from_file_location("cpu_vs_compile", _PATH)
cpu_vs_compile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_vs_compile)


def test_head_to_head_times_both_contenders(monkeypatch, capsys, one_thread):
    from fused_resnet.ops import cpp_backend

    if cpp_backend.unavailable("cpu") is not None:
        pytest.skip(cpp_backend.unavailable("cpu"))
    compiled = []
    monkeypatch.setattr(cpu_vs_compile.torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or model)
    result = cpu_vs_compile.head_to_head("resnet18", batch=1, size=32, rounds=3)
    assert compiled == [{"options": {"freezing": True}}]
    assert result["fused_ms"] > 0 and result["compile_freezing_ms"] > 0 and result["speedup"] > 0
    assert cpu_vs_compile.main(["--model", "resnet18", "--size", "32", "--rounds", "2"]) == 0
    assert "median per-round speedup of fused" in capsys.readouterr().out
