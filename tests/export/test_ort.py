"""ONNX Runtime sessions on the hand-built graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.export.ort import ort_session
from tests.trt.graphs import CHW, NUM_CLASSES, make_model, save_model


@pytest.mark.parametrize("kind, dtype", [("fp32", None), ("fp16", None), ("int8", "fp32"), ("int8", "fp16"),
                                         ("int4", "fp32"), ("int4", "fp16")])
def test_fixture_graphs_are_valid_and_run_in_onnxruntime(kind: str, dtype: str | None) -> None:
    model = make_model(kind, dtype=dtype)
    onnx.checker.check_model(model, full_check=True)
    sess = ort_session(model, optimize=False)
    x = np.random.default_rng(0).normal(size=(2, *CHW)).astype(np.float32)  # FP16 graphs keep a float32 input
    (out,) = sess.run(None, {"input": x})
    assert out.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(out))



# --- ONNX Runtime -----------------------------------------------------------------------------------------
def _reference_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))
    return x.reshape(len(x), -1) @ w


def test_ort_session_runs_the_graph(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = make_model("fp32")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).normal(size=(3, *CHW)).astype(np.float32)
    for sess in (ort_session(path), ort_session(model, threads=1, optimize=False)):
        assert sess.get_providers() == ["CPUExecutionProvider"]
        (out,) = sess.run(None, {"input": x})
        np.testing.assert_allclose(out, _reference_logits(model, x), rtol=1e-5, atol=1e-5)
    opts = ort_session(path, threads=1, optimize=False).get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert ort_session(path).get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_ort_session_gpu_request_keeps_cpu_last(tmp_path: Path) -> None:
    import onnxruntime as ort

    sess = ort_session(save_model(tmp_path, "fp32"), gpu=True)
    providers = sess.get_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert set(providers) <= set(ort.get_available_providers())


def test_ort_session_errors(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="not found"):
        ort_session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(DfqError, match="ONNX Runtime cannot load"):
        ort_session(bad)

