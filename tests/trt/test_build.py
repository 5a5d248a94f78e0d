"""The engine build: parser errors, metadata, no EXPLICIT_BATCH (CPU); real builds (GPU, marked ``gpu``)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.build import build_engine, engine_metadata, engine_metadata_path, format_parser_error
from dfq_deploy.trt.calibrator import read_cache
from dfq_deploy.trt.env import require_tensorrt, trt_version_tuple
from dfq_deploy.trt.inspector import engine_layers, fused_attention_layers, integer_layers, layer_summary
from dfq_deploy.trt.plan import MAX_TRT_MAJOR_CALIBRATOR, EnginePlan
from dfq_deploy.trt.planner import plan_build
from tests.trt.graphs import CHW, HAS_TRT, NUM_CLASSES, requires_gpu, save_calib, save_model, vit_graph


# --- small pure helpers of the build ----------------------------------------------------------------------
class _ParserErrorV10:
    """The parts of ``tensorrt.ParserError`` that :func:`format_parser_error` reads (TensorRT 10 shape)."""

    class _Code:
        name = "UNSUPPORTED_NODE"

    def node_name(self) -> str:
        return "matmul_7"

    def node_operator(self) -> str:
        return "MatMul"

    def node(self) -> int:
        return 7

    def desc(self) -> str:
        return "no kernel for INT4 x INT8"

    def code(self) -> _Code:
        return self._Code()


class _ParserErrorV8:
    def node(self) -> int:
        return 3

    def desc(self) -> str:
        return "bad attribute"


def test_format_parser_error() -> None:
    assert format_parser_error(_ParserErrorV10()) == "MatMul 'matmul_7': no kernel for INT4 x INT8 [UNSUPPORTED_NODE]"
    assert format_parser_error(_ParserErrorV8()) == "node #3: bad attribute"



def test_engine_metadata(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8")
    meta = engine_metadata(plan, "10.3.0.30", {"name": "Orin", "compute_capability": "8.7"}, 12.3456, "ab" * 32)
    assert meta["tensorrt_version"] == "10.3.0.30"
    assert (meta["gpu"], meta["compute_capability"]) == ("Orin", "8.7")
    assert meta["precision"] == "int8" and meta["strongly_typed"] is True and meta["builder_flags"] == []
    assert (meta["graph_dtype"], meta["graph_quant"], meta["profiling_verbosity"]) == ("fp16", "int8", "DETAILED")
    # every profile by index, as TRTEngine selects them; NVIDIA's tools for the same build
    assert meta["profiles"] == [{"index": i, **p.to_dict()} for i, p in enumerate(plan.profiles)]
    assert [(p["min"][0], p["opt"][0], p["max"][0]) for p in meta["profiles"]] == [
        (1, 1, 1), (8, 8, 8), (32, 32, 32), (1, 8, 32)]
    assert meta["batch_sizes"] == [1, 8, 32]
    assert meta["trtexec"].startswith("trtexec --onnx=") and "--profile=3 --minShapes=input:1x3x4x4" in meta["trtexec"]
    assert meta["polygraphy"].startswith("polygraphy run ") and "--optimization-profile 0" in meta["polygraphy"]
    assert set(meta["trtexec_time"]) == {"1", "8", "32"} and "--useProfile=2" in meta["trtexec_time"]["32"]
    assert meta["build_seconds"] == 12.346
    assert EnginePlan.from_dict(meta["plan"]) == plan
    json.dumps(meta)  # serialisable as is
    assert engine_metadata_path(tmp_path / "model.engine") == tmp_path / "model.engine.json"
    calib = plan_build(save_model(tmp_path, "fp32", name="f.onnx"), "best", calibrator="synthetic",
                       calib_from=save_calib(tmp_path), calib_batch_size=2)
    meta = engine_metadata(calib, "10.3.0.30", {}, 1.0)
    assert meta["strongly_typed"] is False and meta["builder_flags"] == ["FP16", "INT8"]
    assert meta["graph_dtype"] == "fp32" and meta["gpu"] is None


def test_build_path_never_uses_explicit_batch() -> None:
    """EXPLICIT_BATCH is gone in TensorRT 11 (AttributeError): no code in the package may use it."""
    pkg = Path(__import__("dfq_deploy").__file__).parent
    hits = []
    for path in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "EXPLICIT_BATCH") or (
                    isinstance(node, ast.Constant) and node.value == "EXPLICIT_BATCH"):
                hits.append(f"{path.relative_to(pkg)}:{node.lineno}")
    assert hits == []


# --- GPU: real builds -------------------------------------------------------------------------------------
def _meta(engine_path: Path) -> dict:
    return json.loads(engine_metadata_path(engine_path).read_text())


def _close_to_ort(engine_path: Path, onnx_path: Path, x: np.ndarray, rel: float) -> np.ndarray:
    """The engine's logits for ``x``, within ``rel`` of the logit scale of ONNX Runtime's (unoptimised)."""
    from dfq_deploy.export.ort import ort_session
    from dfq_deploy.trt.engine import TRTEngine

    ref = ort_session(onnx_path, optimize=False).run(None, {"input": x})[0]
    with TRTEngine(engine_path) as eng:
        out = eng.infer(x)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= rel * np.abs(ref).max()
    return out


@pytest.mark.gpu
@requires_gpu
def test_build_qdq_engine_and_compare_with_onnxruntime(tmp_path: Path) -> None:
    from dfq_deploy.export.ort import ort_session
    from dfq_deploy.trt.engine import TRTEngine

    onnx_path = save_model(tmp_path, "int8", opset=21, dtype="fp16")
    plan = plan_build(onnx_path, "int8", batch=(1, 4, 8), timing_cache=tmp_path / "timing.cache",
                      workspace_mb=256)
    engine_path = build_engine(plan)
    assert engine_path == tmp_path / "model.engine" and engine_path.stat().st_size > 0
    meta = _meta(engine_path)
    assert meta["strongly_typed"] is True and meta["builder_flags"] == [] and meta["precision"] == "int8"
    assert meta["graph_dtype"] == "fp16" and meta["compute_capability"]
    assert len(meta["profiles"]) == 4 and meta["trtexec"].startswith("trtexec ") and meta["polygraphy"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    x = np.random.default_rng(3).normal(size=(5, *CHW)).astype(np.float32)
    ref = ort_session(onnx_path, optimize=False).run(None, {"input": x})[0]
    with TRTEngine(engine_path) as eng:
        assert eng.batch_range == (1, 4, 8)
        out = eng.infer(x)
        out1 = eng.infer(x[:1])
        assert eng.profiles == [(1, 1, 1), (4, 4, 4), (8, 8, 8), (1, 4, 8)]
        with pytest.raises(DfqError, match="batch 9 is outside the engine's profiles"):
            eng.infer(np.zeros((9, *CHW), np.float32))
        assert len(eng.timing_history) == 2 and eng.timing_history[0].compute_ms > 0
        assert set(eng.timings) == {"h2d_ms", "compute_ms", "d2h_ms"}
        assert eng.timings["compute_ms"] == eng.timing_history[-1].compute_ms
    assert out.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(out1, out[:1], rtol=1e-2, atol=1e-2)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 0.05 * scale  # INT8 kernels may flip a quantisation step
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.8


@pytest.mark.gpu
@requires_gpu
def test_build_int4_engine_from_fp16_w4a16_graph(tmp_path: Path) -> None:
    onnx_path = tmp_path / "w4a16.onnx"
    onnx.save(vit_graph("W4A16", "fp16"), str(onnx_path))
    engine_path = build_engine(plan_build(onnx_path, "int4", batch="1,2,4", workspace_mb=512))
    meta = _meta(engine_path)
    assert meta["strongly_typed"] is True and meta["builder_flags"] == []
    assert (meta["graph_quant"], meta["graph_dtype"]) == ("int4", "fp16")
    x = np.random.default_rng(5).normal(size=(3, 3, 32, 32)).astype(np.float32)
    _close_to_ort(engine_path, onnx_path, x, rel=0.05)  # weight-only: FP16 rounding apart


@pytest.mark.gpu
@requires_gpu
def test_int8_build_of_fp16_w8a8_vit_runs_integer_kernels_and_fused_attention(tmp_path: Path) -> None:
    # DeiT-Tiny widths: head dim 64 and 65 tokens, inside TensorRT's INT8 MHA limits (head 16/32/64, seq <= 512)
    onnx_path = tmp_path / "w8a8.onnx"
    onnx.save(vit_graph("W8A8", "fp16"), str(onnx_path))
    engine_path = build_engine(plan_build(onnx_path, "int8", batch="1,8,8", workspace_mb=512))
    assert _meta(engine_path)["builder_flags"] == [] and _meta(engine_path)["graph_dtype"] == "fp16"
    layers = engine_layers(engine_path)
    summary = layer_summary(layers)
    assert integer_layers(layers), f"no INT8 layer reported by the engine inspector: {summary}"
    names = [(la.get("Name"), la.get("TacticName")) for la in layers]
    assert fused_attention_layers(layers), f"no fused attention (mha) layer: {names}"
    x = np.random.default_rng(6).normal(size=(4, 3, 32, 32)).astype(np.float32)
    _close_to_ort(engine_path, onnx_path, x, rel=0.1)  # INT8 kernels may flip quantisation steps


@pytest.mark.gpu
@requires_gpu
def test_fp16_build_of_fp16_float_graph_sets_no_builder_flags(tmp_path: Path) -> None:
    onnx_path = save_model(tmp_path, "fp16")
    engine_path = build_engine(plan_build(onnx_path, "fp16", batch="1,2,4", workspace_mb=256))
    meta = _meta(engine_path)
    assert meta["strongly_typed"] is True and meta["builder_flags"] == [] and meta["graph_dtype"] == "fp16"
    x = np.random.default_rng(4).normal(size=(3, *CHW)).astype(np.float32)
    _close_to_ort(engine_path, onnx_path, x, rel=0.02)


@pytest.mark.gpu
@requires_gpu
def test_build_with_implicit_int8_calibrator(tmp_path: Path) -> None:
    trt = require_tensorrt()
    if trt_version_tuple(trt.__version__)[0] > MAX_TRT_MAJOR_CALIBRATOR:
        pytest.skip(f"TensorRT {trt.__version__}: TensorRT 11 has no calibrators (removed; deprecated since 10.1)")

    plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic",
                      calib_from=save_calib(tmp_path, n=16), calib_batch_size=4, batch="1,4,8")
    engine_path = build_engine(plan)
    assert plan.calibrator is not None and read_cache(plan.calibrator.cache_file)
    meta = _meta(engine_path)
    assert meta["strongly_typed"] is False and meta["builder_flags"] == ["FP16", "INT8"]


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed")
def test_no_calibrators_on_tensorrt_11(tmp_path: Path) -> None:
    trt = require_tensorrt()
    if trt_version_tuple(trt.__version__)[0] <= MAX_TRT_MAJOR_CALIBRATOR:
        pytest.skip(f"TensorRT {trt.__version__} still has calibrators")
    plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic",
                      calib_from=save_calib(tmp_path), calib_batch_size=2)
    with pytest.raises(DfqError, match="TensorRT 11 has no calibrators"):
        build_engine(plan)
    assert not Path(plan.output).exists()
