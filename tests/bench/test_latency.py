"""Latency statistics, the timed loop, and run_benchmark end to end on tiny ONNX graphs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.bench.latency import (
    kernel_summary,
    run_benchmark,
    split_budget,
    summarize,
    time_loop,
    timed_runs,
)
from dfq_deploy.bench.power import PowerSampler
from dfq_deploy.errors import DfqError


def make_onnx(path: Path, hidden: int = 16, qdq: bool = False, batch: int | str = "N") -> Path:
    """x[batch, 16] @ W[16, hidden] -> Relu; with ``qdq`` the input and weight go through Q/DQ (int8)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, hidden)).astype(np.float32)
    nodes, inits = [], []
    if qdq:
        scale = np.float32(np.abs(w).max() / 127)
        wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(np.array(scale), "ws"),
                  numpy_helper.from_array(np.array(0, np.int8), "wz"),
                  numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
                  helper.make_node("MatMul", ["xd", "W"], ["h"])]
    else:
        inits.append(numpy_helper.from_array(w, "W"))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["h"]))
    nodes.append(helper.make_node("Relu", ["h"], ["y"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime refuses onnx 1.23's default IR version
    onnx.save(model, str(path))
    return path


# -- statistics ---------------------------------------------------------------------------------------------


def test_summarize_hand_computed_percentiles():
    # 1..10 ms. Linear interpolation: p50 at rank 4.5 -> 5.5; p90 at rank 8.1 -> 9.1; p99 at rank 8.91 -> 9.91.
    s = summarize([i / 1000 for i in range(1, 11)], batch=8)
    assert s["n"] == 10
    assert s["mean_ms"] == pytest.approx(5.5)
    assert s["p50_ms"] == pytest.approx(5.5)
    assert s["p90_ms"] == pytest.approx(9.1)
    assert s["p99_ms"] == pytest.approx(9.91)
    # Sample std of 1..10: sqrt(sum((i - 5.5)^2) / 9) = sqrt(82.5 / 9).
    assert s["std_ms"] == pytest.approx((82.5 / 9) ** 0.5)
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((1.0, 10.0))
    assert s["throughput_ips"] == pytest.approx(8 / 0.0055)
    assert s["latency_per_image_ms"] == pytest.approx(5.5 / 8)


def test_summarize_odd_count_and_single_sample():
    s = summarize([0.003, 0.001, 0.002])  # unsorted on purpose
    assert s["p50_ms"] == pytest.approx(2.0)
    assert s["p90_ms"] == pytest.approx(2.8)  # rank 1.8: 2 + 0.8 * (3 - 2)
    one = summarize([0.004], batch=2)
    assert one["std_ms"] == 0.0 and one["p99_ms"] == pytest.approx(4.0)
    assert one["throughput_ips"] == pytest.approx(500.0)
    with pytest.raises(ValueError):
        summarize([])


def test_split_budget():
    assert split_budget(10, 3) == [4, 3, 3]
    assert split_budget(2, 5) == [1, 1]
    assert sum(split_budget(101, 7)) == 101


def test_time_loop_counts_warmup_and_iters():
    calls = []
    samples = time_loop(lambda: calls.append(1), warmup=3, iters=7)
    assert len(samples) == 7 and len(calls) == 10
    assert all(s >= 0 for s in samples)


def test_timed_runs_seconds_budget_stops():
    samples, t0, t1 = timed_runs(lambda: sum(range(1000)), seconds=0.05)
    assert len(samples) >= 1
    assert 0.05 <= t1 - t0 < 1.0


def test_time_loop_rejects_both_budgets():
    with pytest.raises(DfqError, match="either --iters or --seconds"):
        time_loop(lambda: None, iters=3, seconds=1.0)


def test_kernel_summary_verdicts():
    assert kernel_summary({"MatMulIntegerToFloat": 4, "Relu": 1})["qdq_fused"] is True
    assert kernel_summary({"DequantizeLinear": 2, "MatMul": 2})["qdq_fused"] is False
    assert kernel_summary({"DequantizeLinear": 1, "QGemm": 1})["qdq_fused"] == "partial"
    assert kernel_summary({"MatMul": 1})["qdq_fused"] is None


# -- run_benchmark --------------------------------------------------------------------------------------------


class ConstantSampler(PowerSampler):
    """A fake source reading a constant 10 W on one rail."""

    source = "fake"

    def __init__(self) -> None:
        super().__init__(interval_s=0.002)
        self.total, self.total_note = "FAKE_IN", "test rail"

    def probe(self) -> str | None:
        return None

    def read(self) -> dict[str, float]:
        return {"FAKE_IN": 10.0}


@pytest.fixture
def two_models(tmp_path: Path) -> list[Path]:
    (tmp_path / "fp32").mkdir()
    (tmp_path / "int8").mkdir()
    return [make_onnx(tmp_path / "fp32" / "model.onnx"), make_onnx(tmp_path / "int8" / "model.onnx", qdq=True)]


def test_run_benchmark_interleaves_and_reports_ratios(two_models):
    sampler = ConstantSampler()
    res = run_benchmark(two_models, batches=[1, 4], warmup=1, iters=6, rounds=3, threads=1, progress=False,
                        power_sampler=sampler)
    a, b = res["artifacts"]
    assert [a["name"], b["name"]] == ["fp32", "int8"]
    assert a["baseline"] and not b["baseline"]

    # Interleaved: per batch size, rounds alternate A B A B A B, and segments never overlap.
    sched = res["schedule"]
    for batch in (1, 4):
        order = [s["artifact"] for s in sched if s["batch"] == batch]
        assert order == [0, 1, 0, 1, 0, 1]
    assert [s["batch"] for s in sched] == [1] * 6 + [4] * 6
    assert all(s["iters"] == 2 for s in sched)
    ends = [(s["t0"], s["t1"]) for s in sched]
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(ends, ends[1:], strict=False))

    for art in (a, b):
        assert [e["batch"] for e in art["batches"]] == [1, 4]
        for e in art["batches"]:
            assert e["latency"]["n"] == 6 and len(e["samples_s"]) == 6
            assert e["latency"]["p50_ms"] == pytest.approx(1e3 * float(np.median(e["samples_s"])))
            en = e["energy"]
            assert en["available"] and en["rail"] == "FAKE_IN"
            assert en["avg_watts"] == pytest.approx(10.0)
            assert en["joules_per_image"] == pytest.approx(10.0 * en["covered_s"] / (6 * e["batch"]))
            assert en["coverage"] == pytest.approx(1.0)
    assert all("vs_baseline" not in e for e in a["batches"])
    for e, base in zip(b["batches"], a["batches"], strict=True):
        vs = e["vs_baseline"]
        assert vs["p50_ratio"] == pytest.approx(e["latency"]["p50_ms"] / base["latency"]["p50_ms"])
        assert vs["speedup_p50"] == pytest.approx(1 / vs["p50_ratio"])
        assert vs["throughput_ratio"] == pytest.approx(e["latency"]["throughput_ips"]
                                                       / base["latency"]["throughput_ips"])
        assert "energy_per_image_ratio" in vs

    # ORT's optimized graph: the float model keeps MatMul, the QDQ one runs an integer kernel.
    ka, kb = a["info"]["kernels"], b["info"]["kernels"]
    assert ka["optimized_graph_ops"].get("MatMul") == 1 and ka["qdq_fused"] is None
    assert kb["integer_kernels"] and kb["dequantize_linear"] == 0 and kb["qdq_fused"] is True
    assert res["power"]["available"] and len(res["power"]["trace"]["t"]) >= 2


def test_run_benchmark_seconds_budget_and_no_sampler(tmp_path):
    m = make_onnx(tmp_path / "a.onnx")
    res = run_benchmark([m], batches=[2], warmup=0, seconds=0.06, rounds=2, threads=1, progress=False)
    e = res["artifacts"][0]["batches"][0]
    assert e["latency"]["n"] >= 2
    assert sum(b - a for a, b in e["segments"]) >= 0.06
    assert e["energy"] == {"available": False, "reason": "no power sampler was given"}


def test_run_benchmark_skips_batch_a_fixed_graph_cannot_take(tmp_path):
    m = make_onnx(tmp_path / "fixed.onnx", batch=1)
    res = run_benchmark([m], batches=[1, 8], warmup=0, iters=2, progress=False)
    b1, b8 = res["artifacts"][0]["batches"]
    assert b1["latency"]["n"] == 2
    assert "fixed batch dimension 1" in b8["skipped"]


def test_run_benchmark_errors(tmp_path):
    m = make_onnx(tmp_path / "a.onnx")
    with pytest.raises(DfqError, match="not found"):
        run_benchmark([tmp_path / "missing.onnx"], progress=False)
    with pytest.raises(DfqError, match="is an ONNX graph"):
        run_benchmark([m], runtime="trt", progress=False)
    with pytest.raises(DfqError, match="either --iters or --seconds"):
        run_benchmark([m], iters=2, seconds=1.0, progress=False)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(DfqError, match="cannot load"):
        run_benchmark([bad], iters=1, progress=False)


def test_run_benchmark_trt_uses_engine_timings(tmp_path, monkeypatch):
    """The TensorRT branch through a stand-in TRTEngine (no GPU here): GPU compute is reported apart."""

    class FakeEngine:
        """The parts of dfq_deploy.trt.engine.TRTEngine the benchmark uses."""

        input_shape = (-1, 16)
        input_dtype = np.dtype(np.float32)
        batch_range = (1, 4, 8)
        tensorrt_version = "10.fake"

        def __init__(self, path, backend=None, keep_timings=True, cuda_graphs=False):
            assert keep_timings is False  # the benchmark keeps its own series
            self.path, self.cuda_graphs = path, cuda_graphs
            self.timings: dict[str, float] = {}
            self.calls = 0
            self.graph_calls = 0

        def infer(self, x):
            self.calls += 1
            self.graph_calls += self.cuda_graphs and self.calls > 1  # replays from the second call on
            self.timings = {"h2d_ms": 0.1, "compute_ms": 0.5 + 0.1 * (self.calls % 2), "d2h_ms": 0.05}
            return [x * 2]

    fake = types.ModuleType("dfq_deploy.trt.engine")
    fake.TRTEngine = FakeEngine
    monkeypatch.setitem(sys.modules, "dfq_deploy.trt.engine", fake)
    engines = []
    for name in ("a.engine", "b.plan"):
        (tmp_path / name).write_bytes(b"\0")
        engines.append(tmp_path / name)
    res = run_benchmark(engines, runtime="trt", batches=[4, 16], warmup=1, iters=4, rounds=2, progress=False)
    assert res["config"]["cuda_graphs"] is True  # CUDA graphs by default
    for art in res["artifacts"]:
        assert art["info"]["tensorrt_version"] == "10.fake" and art["info"]["batch_profile"] == [1, 4, 8]
        assert art["info"]["cuda_graphs"] is True
        assert art["batches"][1] == {"batch": 16, "skipped": f"{art['name']}'s optimisation profile covers batch 1..8"}
        e = art["batches"][0]
        assert e["trt"] == {"cuda_graphs": True, "graph_replays": 4}  # every timed run, after the warm-up
        gt = e["gpu_timings"]
        assert set(gt) == {"h2d", "compute", "d2h"}
        assert gt["compute"]["n"] == 4
        assert gt["compute"]["mean_ms"] == pytest.approx(0.55)  # alternating 0.5 / 0.6 ms
        assert gt["h2d"]["p50_ms"] == pytest.approx(0.1)
    assert res["artifacts"][1]["batches"][0]["vs_baseline"]["p50_ratio"] > 0
    from dfq_deploy.bench.report import bench_markdown, table_rows

    rows = [r for r in table_rows(res) if not r["skipped"]]
    assert [r["gpu_compute_p50_ms"] for r in rows] == pytest.approx([0.55, 0.55])
    assert "compute 0.550" in bench_markdown(res)
    plain = run_benchmark(engines[:1], runtime="trt", batches=[4], warmup=1, iters=3, progress=False,
                          cuda_graphs=False)  # bench --no-cuda-graphs
    assert plain["config"]["cuda_graphs"] is False and plain["artifacts"][0]["info"]["cuda_graphs"] is False
    assert plain["artifacts"][0]["batches"][0]["trt"] == {"cuda_graphs": False, "graph_replays": 0}


def test_run_benchmark_trt_runs_each_batch_on_its_profile(tmp_path, monkeypatch):
    """An engine with per-batch profiles: the batch's profile is recorded, a batch no profile takes is skipped."""

    class ProfiledEngine:
        input_shape = (-1, 16)
        input_dtype = np.dtype(np.float32)
        profiles = [(1, 1, 1), (4, 4, 4), (8, 8, 8)]  # built with --batch 1,4,8 --no-range-profile
        batch_range = (1, 4, 8)
        graph_calls = 0
        timings: dict[str, float] = {}

        def __init__(self, path, backend=None, keep_timings=True, cuda_graphs=False):
            pass

        def infer(self, x):
            return [x]

    fake = types.ModuleType("dfq_deploy.trt.engine")
    fake.TRTEngine = ProfiledEngine
    monkeypatch.setitem(sys.modules, "dfq_deploy.trt.engine", fake)
    (tmp_path / "m.engine").write_bytes(b"\0")
    res = run_benchmark([tmp_path / "m.engine"], runtime="trt", batches=[1, 3, 8], warmup=0, iters=2,
                        progress=False)
    art = res["artifacts"][0]
    assert art["info"]["profiles"] == [[1, 1, 1], [4, 4, 4], [8, 8, 8]]
    b1, b3, b8 = art["batches"]
    assert b1["trt"]["profile"] == 0 and b1["trt"]["profile_batch"] == [1, 1, 1]
    assert b8["trt"]["profile"] == 2
    assert "batch 3 is outside the engine's profiles (batch 1, batch 4, batch 8)" in b3["skipped"]


def test_run_benchmark_trt_without_tensorrt_is_a_one_line_error(tmp_path):
    """With the real dfq_deploy.trt.engine and no TensorRT / GPU here, the engine cannot open: a DfqError."""
    pytest.importorskip("dfq_deploy.trt.engine")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(DfqError):
        run_benchmark([engine], runtime="trt", iters=1, progress=False)
