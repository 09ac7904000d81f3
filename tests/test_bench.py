"""fused_resnet.bench: roofline counting against anchors.md, timing statistics, the contender plan, the report
writers, the max-batch search, and a smoke run of the CLI on the tiny profile."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
import torchvision

from fused_resnet import backends
from fused_resnet.bench import cli, contenders, report, roofline, runner, summary
from fused_resnet.bench.layers import layer_type, unique_conv_layers
from fused_resnet.bench.maxbatch import largest_fitting
from fused_resnet.bench.profiles import PROFILES, Group
from fused_resnet.bench.timing import Timing, time_interleaved

H100 = roofline.datasheet_peaks("NVIDIA H100 80GB HBM3")


@pytest.fixture(scope="module")
def resnet50_layers() -> list[roofline.Layer]:
    return roofline.model_layers(torchvision.models.resnet50(), (256, 3, 224, 224))


# anchors.md: ResNet-50 inference ceilings, bf16, large batch, H100 SXM datasheet peaks. Our per-layer roofline
# is an estimate of the same thing from the model's own shapes; it reproduces them within a few percent
# (compile-like: 31.9k vs ~30.5k; train: 19.9k vs ~22k, since the byte count of fused training is the roughest).
@pytest.mark.parametrize(
    ("structure", "anchor", "tolerance"),
    [
        ("compute", 121e3, 0.05),
        ("fused", 53e3, 0.10),
        ("compile", 30.5e3, 0.10),
        ("eager", 20.5e3, 0.10),
        ("train", 22e3, 0.15),
    ],
)
def test_roofline_reproduces_anchor_ceilings(
    resnet50_layers: list, structure: str, anchor: float, tolerance: float
) -> None:
    images_per_s = roofline.ceilings(resnet50_layers, 256, H100, torch.bfloat16, "cuda")[structure]
    assert images_per_s == pytest.approx(anchor, rel=tolerance)


def test_fusion_gain_over_compile_matches_anchors(resnet50_layers: list) -> None:
    c = roofline.ceilings(resnet50_layers, 256, H100, torch.bfloat16, "cuda")
    assert c["fused"] / c["compile"] == pytest.approx(1.7, rel=0.1)
    assert c["fused"] / c["eager"] == pytest.approx(2.6, rel=0.1)


@pytest.mark.parametrize(("name", "gflop"), [("resnet18", 3.63), ("resnet50", 8.18), ("resnet152", 23.03)])
def test_model_flops_match_the_anchor_table(name: str, gflop: float) -> None:
    model = getattr(torchvision.models, name)()
    assert roofline.model_flops(model, (1, 3, 224, 224)) / 1e9 == pytest.approx(gflop, rel=0.01)
    if name == "resnet152":
        return  # its backward on the meta device alone takes seconds
    train = roofline.model_flops(model, (1, 3, 224, 224), train=True) / 1e9
    # backward ≈ 2× forward, less the stem's input gradient, which nobody needs
    assert 2.85 * gflop <= train <= 3 * gflop


def test_model_layers_find_the_epilogues() -> None:
    layers = roofline.model_layers(torchvision.models.resnet18(), (2, 3, 64, 64))
    convs = {layer.name: layer for layer in layers if layer.kind == "conv"}
    assert len(convs) == 20
    assert [layer.kind for layer in layers if layer.kind != "conv"] == ["pool", "pool", "linear"]
    stem, shortcut, last = convs["conv1"], convs["layer2.0.downsample.0"], convs["layer2.0.conv2"]
    assert (stem.bn, stem.residual, stem.relu) == (True, False, True)
    assert (shortcut.bn, shortcut.residual, shortcut.relu) == (True, False, False)
    assert (last.bn, last.residual, last.relu) == (True, True, True)
    assert sum(layer.residual for layer in convs.values()) == 8  # one per BasicBlock
    assert stem.geometry == (3, 64, 7, 7, 2, 3, 64, 64, 1) and stem.output_hw == (32, 32)
    assert stem.flops == 2 * 2 * 64 * 32 * 32 * 3 * 7 * 7


def test_layer_bytes_per_structure() -> None:
    layer = roofline.Layer(
        "c", "conv", 0, input_elems=10, weight_elems=3, output_elems=100, bn=True, residual=True, relu=True
    )
    assert roofline.layer_bytes(layer, "fused", 2) == 2 * (10 + 3 + 100 + 100)
    assert roofline.layer_bytes(layer, "compile", 2) == 2 * (10 + 3 + 100 + 100 + 200)
    assert roofline.layer_bytes(layer, "eager", 2) == 2 * (10 + 3 + 100 + 200 + 300 + 200)
    assert roofline.layer_bytes(layer, "train", 1) == (10 + 3 + 100 + 100) + (100 + 3 + 10) + (100 + 10 + 3)
    with pytest.raises(ValueError, match="structure"):
        roofline.layer_bytes(layer, "magic", 2)


def test_datasheet_peaks_by_device_name() -> None:
    assert roofline.datasheet_peaks("NVIDIA H100 80GB HBM3").bandwidth_tbs == 3.35
    assert roofline.datasheet_peaks("NVIDIA H200").bandwidth_tbs == 4.8
    assert roofline.datasheet_peaks("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert roofline.datasheet_peaks("NVIDIA A100-SXM4-80GB").tflops["bf16"] == 312.0
    assert roofline.datasheet_peaks("NVIDIA GeForce RTX 4090") is None


def test_measured_peaks_on_cpu() -> None:
    peaks = roofline.measure_peaks(torch.device("cpu"), (torch.float32,))
    assert peaks.source == "measured" and peaks.tflops["fp32"] > 0 and peaks.bandwidth_tbs > 0


def test_unique_layers_and_types() -> None:
    layers = roofline.model_layers(torchvision.models.resnet50(), (1, 3, 224, 224))
    cases = unique_conv_layers(layers)
    assert sum(case.count for case in cases) == 53
    types = {layer_type(case.layer) for case in cases}
    assert {"7x7/2 stem", "3x3/1", "3x3/2", "1x1/1", "1x1/1 +add", "1x1/2 shortcut"} <= types


def test_timing_statistics() -> None:
    t = Timing((5.0, 1.0, 3.0, 2.0, 4.0))
    assert t.median == 3.0
    assert t.quantile(0.0) == 1.0 and t.quantile(1.0) == 5.0
    assert t.quantile(0.2) == pytest.approx(1.8)
    assert t.quantile(0.9) == pytest.approx(4.6)


def test_time_interleaved_collects_a_sample_per_round() -> None:
    calls: list[str] = []
    timings = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), rounds=4, inner={"a": 2}
    )
    assert [len(t.samples_ms) for t in timings.values()] == [4, 4]
    assert calls.count("a") == 8 and calls.count("b") == 4
    assert calls[:3] == ["a", "a", "b"] and calls[3] == "b"  # the order rotates every round


def test_gpu_timing_fields_carry_host_time_and_allocator_counts(tmp_path: object) -> None:
    # On CPU there is no separate host time and no caching allocator: no such fields.
    cpu = time_interleaved({"a": lambda: None}, torch.device("cpu"), rounds=2)["a"]
    assert cpu.host_ms == () and "host_ms_p50" not in runner.timing_fields(cpu, 2)
    gpu = Timing((10.0, 12.0, 11.0), host_ms=(4.0, 9.0, 5.0), cuda_mallocs=3, alloc_retries=1)
    fields = runner.timing_fields(gpu, 2)
    assert fields["host_ms_p50"] == 5.0 and fields["cuda_mallocs"] == 3 and fields["alloc_retries"] == 1
    report.append(tmp_path, [_row(**fields), _row(contender="quiet", **runner.timing_fields(cpu, 2))])
    text = report.write_markdown(tmp_path)
    assert "| 11 [10.4-11.6] | 11.8 | 5 |" in text
    assert "3 cudaMalloc, 1 allocator retries while timed" in text
    assert text.count("while timed") == 1


@pytest.mark.parametrize("threshold", [0, 1, 5, 63, 64, 100, 1000, 5000, 40000])
def test_largest_fitting_batch(threshold: int) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= threshold

    found = largest_fitting(fits, start=64, limit=1 << 15)
    assert found <= min(threshold, 1 << 15)
    assert found >= min(threshold, 1 << 15) * 15 / 16
    assert len(tried) < 30


def _names(group: Group, profile_name: str, device: str) -> list[str]:
    return [c.name for c in contenders.plan(group, PROFILES[profile_name], torch.device(device))]


def test_contender_plan() -> None:
    cpu_inference = _names(Group("resnet50", 4, torch.float32, "inference"), "cpu", "cpu")
    assert cpu_inference[:4] == ["eager", "eager_cl", "eager_cl+autocast", "bn_folded_cl"]
    assert {"fused:reference", "fused:cpu", "compile", "compile_freezing"} <= set(cpu_inference)
    assert "compile" not in _names(Group("resnet50", 1, torch.float32, "inference"), "cpu", "cpu")
    cpu_train = _names(Group("resnet50", 4, torch.float32, "train"), "cpu", "cpu")
    assert "fused:cpu" in cpu_train and "compile" not in cpu_train  # a training graph compiles for minutes on CPU
    gpu_small = _names(Group("resnet50", 1, torch.bfloat16, "inference"), "gpu-full", "cuda")
    assert {"compile_max_autotune", "compile_reduce_overhead", "fused:triton", "fused:cuda"} <= set(gpu_small)
    gpu_large = _names(Group("resnet50", 256, torch.bfloat16, "inference"), "gpu-full", "cuda")
    assert "compile_reduce_overhead" not in gpu_large
    assert not any(name.endswith("+graph") for name in gpu_large)  # only when asked for
    with_graphs = PROFILES["gpu-full"].with_overrides(graph_replays=True)
    gpu_graphs = [
        c.name
        for c in contenders.plan(Group("resnet50", 256, torch.bfloat16, "inference"), with_graphs, torch.device("cuda"))
    ]
    graphs = {f"fused:{n}+graph" for n in ("triton", "cuda") if backends.unavailable_reason(n) is None}
    assert {"eager_cl+graph", *graphs} <= set(gpu_graphs)
    assert cli.make_profile(cli.parse_args(["--profile", "gpu-quick", "--graph-replays"])).graph_replays
    assert not PROFILES["gpu-quick"].max_autotune
    assert cli.make_profile(cli.parse_args(["--profile", "gpu-quick", "--max-autotune"])).max_autotune
    assert cli.make_profile(cli.parse_args(["--profile", "gpu-full"])).max_autotune
    only_args = ["--profile", "gpu-full", "--contenders", "fused:cuda,compile_max_autotune"]
    only = cli.make_profile(cli.parse_args(only_args))
    only_plan = contenders.plan(Group("resnet50", 256, torch.bfloat16, "inference"), only, torch.device("cuda"))
    assert [c.name for c in only_plan] == ["eager", "fused:cuda", "compile_max_autotune"]  # eager: the × baseline
    assert not any(name.endswith("+graph") for name in cpu_inference)
    train = _names(Group("resnet50", 256, torch.bfloat16, "train"), "gpu-full", "cuda")
    assert train[0] == "eager+autocast" and "bn_folded_cl" not in train and "compile_freezing" not in train
    assert all(name.endswith("+autocast") for name in train)
    train_graphs = [
        c for c in contenders.plan(Group("resnet50", 256, torch.bfloat16, "train"), with_graphs, torch.device("cuda"))
    ]
    replays = {c.name: c for c in train_graphs if c.compile_mode == "graph"}  # whole train steps, replayed
    assert {"eager_cl+autocast+graph", *(g.replace("+graph", "+autocast+graph") for g in graphs)} == set(replays)
    assert all(c.autocast == torch.bfloat16 and c.dtype == torch.float32 for c in replays.values())


def test_hopper_engine_contender_runs_its_steps_on_that_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from fused_resnet.ops import cpp_backend

    monkeypatch.setattr(contenders, "hopper_engine_runs", lambda device: True)
    profile = PROFILES["gpu-quick"]
    inference = contenders.plan(Group("resnet50", 256, torch.bfloat16, "inference"), profile, torch.device("cuda"))
    pinned = [c for c in inference if c.cuda_engine is not None]
    others = [e for e in cpp_backend.CUDA_ENGINES if e != cpp_backend.cuda_engine()]
    assert [(c.name, c.backend, c.cuda_engine) for c in pinned] == [(f"fused:cuda+{e}", "cuda", e) for e in others]
    assert len(pinned) == len(cpp_backend.CUDA_ENGINES) - 1
    for c in pinned:
        assert summary._backend_of(c.name) == "cuda"  # the targets count it as a variant of the cuda backend
    fp32 = contenders.plan(Group("resnet50", 256, torch.float32, "inference"), profile, torch.device("cuda"))
    assert all(c.cuda_engine is None for c in fp32)  # the Hopper engine runs 16-bit convs only
    train = contenders.plan(Group("resnet50", 256, torch.bfloat16, "train"), profile, torch.device("cuda"))
    assert all(c.cuda_engine is None for c in train)  # training runs stock convs: no engine to choose
    if cpp_backend._C is None or not cpp_backend._C.has_sm90_engine():
        pytest.skip("_C was built without the sm90 engine")

    class Recorder(torch.nn.Module):
        engines: list[str] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.engines.append(cpp_backend.cuda_engine())
            return x

    before = cpp_backend.cuda_engine()
    for engine in cpp_backend.CUDA_ENGINES:
        on_cpu = contenders.Contender(f"fused:cuda+{engine}", "fused", torch.channels_last, torch.float32,
                                      backend="cuda", cuda_engine=engine)  # fmt: skip
        step = contenders.make_step(on_cpu, Recorder(), torch.zeros(1, 3, 4, 4), torch.zeros(1), train=False)
        step()
        assert Recorder.engines[-1] == engine and cpp_backend.cuda_engine() == before


def _row(**fields: object) -> dict:
    env = {k: "x" for k in report.ENV_FIELDS}
    return {
        **env,
        "profile": "p",
        "model": "resnet18",
        "mode": "inference",
        "contender": "eager",
        "dtype": "fp32",
        "memory_format": "nchw",
        "batch": 2,
        "status": "ok",
        **fields,
    }


def test_target_lines_compare_each_fused_backend_with_the_named_baseline() -> None:
    def row(mode: str, batch: int, contender: str, img_s: float, **fields: object) -> dict:
        return _row(
            model="resnet50", dtype="bf16", mode=mode, batch=batch, contender=contender, images_per_s=img_s, **fields
        )

    rows = [
        row("inference", 256, "compile_max_autotune", 1000.0),
        row("inference", 256, "eager_cl+autocast", 500.0),
        row("inference", 256, "fused:triton", 1300.0),
        row("inference", 256, "fused:cuda", 900.0),
        row("inference", 256, "fused:cuda+graph", 1100.0),  # the backend's best variant counts
        row("inference", 256, "fused:reference", 5000.0),  # the reference is no fused engine
        row("inference", 256, "fused:triton+graph", 9999.0, status="failed"),
        row("train", 256, "eager+autocast", 100.0, peak_mem_mb=1000.0),
        row("train", 256, "fused:cuda+autocast", 140.0, peak_mem_mb=700.0),
        row("train", 256, "compile+autocast", 150.0),
        _row(model="resnet50", dtype="fp32", mode="train", batch=256, contender="fused:cuda", images_per_s=1e6),
    ]
    lines = summary.target_lines(rows)
    assert (
        "target resnet50 bf16 inference b=256: fused:triton 1,300 img/s = 1.3x compile_max_autotune (1,000); "
        "target >= 1.25x: met" in lines
    )
    assert any(
        line.startswith("target resnet50 bf16 inference b=256: fused:cuda+graph") and "MISSED" in line for line in lines
    )
    assert any("fused:triton 1,300 img/s = 2.6x eager_cl+autocast" in line and line.endswith("met") for line in lines)
    assert "target resnet50 bf16 inference b=32: fused >= 1.2x compile_max_autotune: not measured" in lines[4]
    assert any(
        "fused:cuda+autocast 140 img/s = 1.4x eager+autocast" in line and line.endswith(": met") for line in lines
    )
    assert any(
        "1.4x eager+autocast" not in line and "0.933x compile+autocast" in line and "MISSED" in line for line in lines
    )
    assert lines[-1].endswith("= 0.7x eager+autocast; target <= 0.75x: met")
    assert not any("reference" in line or "9,999" in line or "1e+06" in line for line in lines)


def test_report_writers(tmp_path: object) -> None:
    rows = [
        _row(images_per_s=10.0, ms_p50=200.0, ms_p20=190.0, ms_p80=210.0, rel_err=0.0),
        _row(contender="bad", status="failed", error="RuntimeError: boom"),
    ]
    report.append(tmp_path, rows, run={"env": {**rows[0], "load_avg": "0"}, "profile": "p"}, done=[["k"]])
    report.append(tmp_path, rows[:1])
    with (tmp_path / report.RESULTS_CSV).open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 3 and list(written[0]) == report.ROW_FIELDS
    assert written[0]["images_per_s"] == "10" and written[1]["error"] == "RuntimeError: boom"
    data = json.loads((tmp_path / report.RESULTS_JSON).read_text())
    assert len(data["rows"]) == 3 and data["done"] == [["k"]]
    text = report.write_markdown(tmp_path)
    assert "| eager | fp32 | nchw | 2 | 10 | 200 [190-210] |" in text
    assert "failed; RuntimeError: boom" in text
    with pytest.raises(ValueError, match="not in ROW_FIELDS"):
        report.append(tmp_path, [_row(bogus=1)])


def test_cli_smoke_run_resume_and_failures(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model: object) -> None:
        raise RuntimeError("folding exploded\nsecond line")

    monkeypatch.setattr(contenders, "fold_bn", broken)
    out = tmp_path / "out"
    assert cli.main(["--profile", "smoke", "--out", str(out), "--threads", "1"]) == 0
    data = report.load(out)
    rows = {(r["mode"], r["contender"]): r for r in data["rows"] if r["mode"] != "layer"}
    assert rows[("inference", "bn_folded_cl")]["status"] == "failed"
    assert rows[("inference", "bn_folded_cl")]["error"] == "RuntimeError: folding exploded"
    for key in [("inference", "eager"), ("inference", "fused:reference"), ("train", "fused:reference")]:
        row = rows[key]
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["rel_err"] < 1e-4 and row["device"].startswith("CPU") and row["torch"] == torch.__version__
    assert rows[("inference", "eager")]["rel_err"] == 0.0
    layer_rows = [r for r in data["rows"] if r["mode"] == "layer"]
    assert {r["contender"] for r in layer_rows} >= {"conv", "stock", "fused:reference"}
    assert all(r["status"] == "ok" for r in layer_rows)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["layers.png", "report.md", "results.csv", "results.json", "throughput.png"])
    assert "## resnet18 inference (CPU" in (out / "report.md").read_text()

    lines = summary.headlines(data["rows"])
    assert any(line.startswith("[smoke] resnet18 b=2 fp32 inference: best stock") for line in lines)
    assert any("FAILED: bn_folded_cl" in line for line in lines)

    n_rows = len(data["rows"])
    start = time.monotonic()
    assert cli.main(["--profile", "smoke", "--out", str(out), "--threads", "1", "--resume"]) == 0
    assert len(report.load(out)["rows"]) == n_rows  # everything was done already
    assert time.monotonic() - start < 20


def test_a_fault_during_timing_fails_the_rows_not_the_run(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def fault(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "time_interleaved", fault)
    out = tmp_path / "out"
    args = ["--profile", "smoke", "--out", str(out), "--threads", "1", "--mode", "inference", "--no-layers"]
    assert cli.main(args) == 0
    rows = [r for r in report.load(out)["rows"] if r["status"] != "skipped"]
    assert rows and all(r["status"] == "failed" for r in rows)
    assert all(r["error"].startswith("during the interleaved timing: RuntimeError: CUDA error") for r in rows)


def test_cpu_threads_drop_to_one_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    assert cli.cpu_threads(None) == 1
    assert cli.cpu_threads(2) == 2
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert cli.cpu_threads(None) == torch.get_num_threads()


def test_layer_table_shows_a_layer_left_out_by_the_budget_without_a_column_of_its_own() -> None:
    def layer_row(layer: str, contender: str, **fields: object) -> dict:
        return {"layer": layer, "layer_type": "1x1/1", "contender": contender, "status": "ok", **fields}

    rows = [
        layer_row("a", "conv", ms_p50=0.1, speedup_vs_eager=2.0, pct_ceiling=50.0),
        layer_row("a", "fused", ms_p50=0.2, speedup_vs_eager=1.0, pct_ceiling=25.0),
        layer_row("b", "-", status="skipped", error="out of time"),
    ]
    header, _, first, left_out = report._layer_table(rows).splitlines()
    assert header.count("µs (× stock)") == 2 and "- µs" not in header
    assert first.count("|") == left_out.count("|") == header.count("|")
    assert "| b | 1x1/1 | skipped: out of time |  |  |" in left_out


def test_parity_judge_marks_a_fused_row_off_the_reference() -> None:
    from fused_resnet.bench import parity

    def row(contender: str, dtype: str, err: float, status: str = "ok") -> dict:
        return {"contender": contender, "dtype": dtype, "rel_err": err, "status": status}

    cpu = torch.device("cpu")
    rows = [
        row("eager", "fp32", 0.0),
        row("eager_cl+autocast", "bf16", 2e-2),
        row("fused:cpu", "fp32", 5e-6),  # within fp32's 1e-5
        row("fused:reference", "fp32", 2e-5),  # past it
        row("fused:cpu+autocast", "bf16", 3.9e-2),  # within 4e-2
        row("fused:triton+autocast", "bf16", 5e-2),  # past 4e-2 but within 4x stock's 2e-2
        row("fused:cuda+autocast", "bf16", float("nan")),
        row("fused:x", "fp32", 1.0, status="failed"),  # already failed: left alone
    ]
    parity.judge(rows, cpu)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "wrong", "ok", "ok", "wrong", "failed"]
    assert "2e-05" in rows[3]["error"] and "past the bound 1e-05" in rows[3]["error"]


def test_a_wrong_fused_kernel_is_reported_wrong(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    backends.load_backends()
    good = backends.get_backend("reference")

    def off(*args: object) -> torch.Tensor:
        return good.conv_bias_act(*args) + 1e-3

    monkeypatch.setitem(backends._LOADED, "reference", replace(good, conv_bias_act=off, launch=off))
    out = tmp_path / "out"
    args = ["--profile", "smoke", "--out", str(out), "--threads", "1", "--mode", "inference", "--no-layers"]
    assert cli.main(args) == 0
    rows = {r["contender"]: r for r in report.load(out)["rows"]}
    assert rows["fused:reference"]["status"] == "wrong" and rows["eager"]["status"] == "ok"
    lines = summary.headlines(report.load(out)["rows"])
    assert any("WRONG RESULT" in line and "fused:reference" in line for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "resnet999"], "unknown model"),
        (["--batch", "0"], "positive integers"),
        (["--batch", "abc"], "positive integers"),
        (["--threads", "-3"], "at least 1"),
        (["--models", "resnet50", "--layers-only"], "no per-layer rows"),
    ],
)
def test_cli_refuses_bad_arguments(tmp_path: object, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        cli.main(["--profile", "smoke", "--out", str(tmp_path / "out"), *args])


def test_cli_batch_applies_to_every_group_and_a_new_run_replaces_the_old(tmp_path: object, capsys) -> None:
    out = tmp_path / "out"
    args = ["--profile", "smoke", "--out", str(out), "--threads", "1", "--batch", "3", "--contenders", "fused:cpuu"]
    assert cli.main(args) == 0
    assert "--contenders: no group of this run has fused:cpuu" in capsys.readouterr().err
    rows = report.load(out)["rows"]
    assert rows and {r["batch"] for r in rows} == {3}  # inference, train and the per-layer rows
    assert {r["mode"] for r in rows} >= {"inference", "train", "layer"}
    assert cli.main(args) == 0
    assert "replacing the results of an earlier run" in capsys.readouterr().err
    assert len(report.load(out)["rows"]) == len(rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "0", "3", "64", "64"], "no empty dimension"),
        (["--shape", "1", "3", "64", "64"], "at least 2 images"),
        (["--backend", "bogus"], "unknown backend"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    ],
)
def test_parity_check_refuses_bad_arguments(args: list[str], message: str, capsys) -> None:
    from fused_resnet import check

    with pytest.raises(SystemExit):
        check.main(args)
    assert message in capsys.readouterr().err


def test_resume_after_the_time_budget_leaves_no_stale_skipped_rows(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = contenders.build

    def slow_first(*a: object, **k: object) -> object:  # the budget runs out after the first contender's build
        monkeypatch.setattr(contenders, "build", build)
        time.sleep(6.0)
        return build(*a, **k)

    monkeypatch.setattr(contenders, "build", slow_first)
    out = tmp_path / "out"
    args = ["--profile", "smoke", "--out", str(out), "--threads", "1", "--mode", "inference", "--no-layers"]
    assert cli.main([*args, "--max-minutes", "0.08"]) == 0
    cut = report.load(out)["rows"]
    assert any(r["status"] == "skipped" for r in cut) and any(r["status"] == "ok" for r in cut)
    assert cli.main([*args, "--resume"]) == 0
    rows = report.load(out)["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    assert len(rows) == len(cut)  # the cut group's rows were replaced, not kept beside the new ones
    with (out / report.RESULTS_CSV).open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_the_report_header_says_what_ran_and_how_busy_the_machine_was() -> None:
    env = {
        "date": "d", "device": "CPU: x (2 threads)", "driver": "n/a", "torch": "t", "triton": "3", "cuda": "13.0",
        "cudnn": "9", "git_commit": "c", "load_avg": "0.1 0.1 0.1", "cpu_count": "2",
    }  # fmt: skip
    run = {"env": env, "profile": "cpu", "args": {"batch": "['3']", "resume": "False", "out": "o"}, "max_load": 3.2}
    text = report.markdown({"runs": [run], "rows": [], "roofline": []})
    assert "torch built for CUDA 13.0, cuDNN 9 (unused here)" in text
    assert "up to 3.2 during the run" in text and "the machine was busy" in text
    assert "with batch=['3']" in text and "resume" not in text
