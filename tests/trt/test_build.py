"""The engine build: parser errors, metadata (CPU); real builds (GPU, marked ``gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.build import build_engine, engine_metadata, engine_metadata_path, format_parser_error
from dfq_deploy.trt.calibrator import (
    read_cache,
)
from dfq_deploy.trt.env import require_tensorrt
from dfq_deploy.trt.plan import EnginePlan
from dfq_deploy.trt.planner import (
    plan_build,
)
from tests.trt.graphs import CHW, NUM_CLASSES, requires_gpu, save_calib, save_model


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
    plan = plan_build(save_model(tmp_path, "int8"), "int8")
    meta = engine_metadata(plan, "10.3.0.30", {"name": "Orin", "compute_capability": "8.7"}, 12.3456, True, (),
                           "ab" * 32)
    assert meta["tensorrt_version"] == "10.3.0.30"
    assert (meta["gpu"], meta["compute_capability"]) == ("Orin", "8.7")
    assert meta["precision"] == "int8" and meta["strongly_typed"] is True and meta["builder_flags"] == []
    assert meta["profile"] == plan.profile.to_dict()
    assert meta["build_seconds"] == 12.346
    assert EnginePlan.from_dict(meta["plan"]) == plan
    json.dumps(meta)  # serialisable as is
    assert engine_metadata_path(tmp_path / "model.engine") == tmp_path / "model.engine.json"


# --- GPU: real builds -------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpu
def test_build_qdq_engine_and_compare_with_onnxruntime(tmp_path: Path) -> None:
    from dfq_deploy.runtime import TRTEngine, ort_session

    onnx_path = save_model(tmp_path, "int8", opset=21)
    plan = plan_build(onnx_path, "int8", batch=(1, 4, 8), timing_cache=tmp_path / "timing.cache",
                      workspace_mb=256)
    engine_path = build_engine(plan)
    assert engine_path == tmp_path / "model.engine" and engine_path.stat().st_size > 0
    meta = json.loads(engine_metadata_path(engine_path).read_text())
    assert meta["strongly_typed"] is True and meta["builder_flags"] == [] and meta["precision"] == "int8"
    assert meta["compute_capability"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    x = np.random.default_rng(3).normal(size=(5, *CHW)).astype(np.float32)
    ref = ort_session(onnx_path, optimize=False).run(None, {"input": x})[0]
    with TRTEngine(engine_path) as eng:
        assert eng.batch_range == (1, 4, 8)
        out = eng.infer(x)
        out1 = eng.infer(x[:1])
        with pytest.raises(DfqError, match="outside the engine's profile"):
            eng.infer(np.zeros((9, *CHW), np.float32))
        assert len(eng.timing_history) == 2 and eng.timing_history[0].compute_ms > 0
        assert set(eng.timings) == {"h2d_ms", "compute_ms", "d2h_ms"}
        assert eng.timings["compute_ms"] == eng.timing_history[-1].compute_ms
    assert out.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(out1, out[:1], rtol=1e-3, atol=1e-3)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 0.05 * scale  # INT8 kernels may flip a quantisation step
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.8


@pytest.mark.gpu
@requires_gpu
def test_build_fp16_engine_from_float_graph(tmp_path: Path) -> None:
    from dfq_deploy.runtime import TRTEngine, ort_session

    onnx_path = save_model(tmp_path, "fp32")
    engine_path = build_engine(plan_build(onnx_path, "fp16", batch="1,2,4", workspace_mb=256))
    x = np.random.default_rng(4).normal(size=(3, *CHW)).astype(np.float32)
    ref = ort_session(onnx_path).run(None, {"input": x})[0]
    with TRTEngine(engine_path) as eng:
        out = eng.infer(x)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_gpu
def test_build_with_implicit_int8_calibrator(tmp_path: Path) -> None:
    trt = require_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 calibration")

    plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic",
                      calib_from=save_calib(tmp_path, n=16), calib_batch_size=4, batch="1,4,8")
    assert build_engine(plan).is_file()
    assert plan.calibrator is not None and read_cache(plan.calibrator.cache_file)
