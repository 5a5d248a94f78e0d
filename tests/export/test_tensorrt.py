"""TensorRT backend: build plans, calibration batching and caches (CPU), engine builds (GPU, marked ``gpu``).

The ONNX graphs are tiny and built by hand with ``onnx.helper``: ``input [N, 3, 4, 4] -> Flatten -> MatMul ->
logits [N, 10]``, as float, INT8 Q/DQ (per-tensor activation, per-channel weight) or INT4 weight-only
(blocked ``DequantizeLinear``, opset 21).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.export.tensorrt import (
    TRT_MISSING_MESSAGE,
    CalibrationBatcher,
    CalibratorSettings,
    EnginePlan,
    ShapeProfile,
    check_trt_version,
    engine_metadata,
    engine_metadata_path,
    format_parser_error,
    gpu_available,
    inspect_onnx,
    load_calib_images,
    parse_batch_range,
    plan_build,
    read_cache,
    require_tensorrt,
    resolve_network_mode,
    trt_severity_level,
    write_cache,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
CHW = (3, 4, 4)
NUM_CLASSES = 10


def _gpu_skip_reason() -> str:
    reasons = []
    if not HAS_TRT:
        reasons.append("tensorrt is not installed")
    ok, why = gpu_available()
    if not ok:
        reasons.append(f"no usable NVIDIA GPU ({why})")
    return "needs TensorRT and an NVIDIA GPU: " + "; ".join(reasons) if reasons else ""


GPU_SKIP = _gpu_skip_reason()
requires_gpu = pytest.mark.skipif(bool(GPU_SKIP), reason=GPU_SKIP or "TensorRT and GPU available")


# --- tiny hand-built graphs -------------------------------------------------------------------------------
def make_model(kind: str = "fp32", batch: str | int = "batch", chw: tuple[int, int, int] = CHW,
               opset: int = 21, seed: int = 0, bad_zero_point: bool = False) -> onnx.ModelProto:
    """``input -> Flatten -> MatMul(W) -> logits`` as ``fp32``, ``fp16``, ``int8`` (Q/DQ) or ``int4``."""
    rng = np.random.default_rng(seed)
    k = int(np.prod(chw))
    w = rng.normal(0, 0.2, (k, NUM_CLASSES)).astype(np.float32)
    elem = TensorProto.FLOAT16 if kind == "fp16" else TensorProto.FLOAT
    x = helper.make_tensor_value_info("input", elem, [batch, *chw])
    y = helper.make_tensor_value_info("logits", elem, [batch, NUM_CLASSES])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1)]
    inits: list[onnx.TensorProto] = []
    act, weight = "flat", "W"
    if kind in ("fp32", "fp16"):
        inits.append(numpy_helper.from_array(w.astype(np.float16 if kind == "fp16" else np.float32), "W"))
    elif kind == "int8":
        zp_type = TensorProto.UINT8 if bad_zero_point else TensorProto.INT8
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                  helper.make_tensor("a_zp", zp_type, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["flat", "a_scale", "a_zp"], ["flat_q"], name="a_q"),
                  helper.make_node("DequantizeLinear", ["flat_q", "a_scale", "a_zp"], ["flat_dq"], name="a_dq")]
        w_scale = np.abs(w).max(0) / 127
        w_int = np.clip(np.round(w / w_scale), -127, 127).astype(np.int64)
        inits += [helper.make_tensor("W_int8", TensorProto.INT8, list(w_int.shape), w_int.flatten().tolist()),
                  numpy_helper.from_array(w_scale.astype(np.float32), "W_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["W_int8", "W_scale"], ["W_dq"], name="w_dq", axis=1))
        act, weight = "flat_dq", "W_dq"
    elif kind == "int4":
        block = 16
        w_scale = np.abs(w.reshape(k // block, block, NUM_CLASSES)).max(1) / 7  # [K/block, N]
        w_int = np.clip(np.round(w / np.repeat(w_scale, block, axis=0)), -8, 7).astype(np.int64)
        inits += [helper.make_tensor("W_int4", TensorProto.INT4, list(w_int.shape), w_int.flatten().tolist()),
                  numpy_helper.from_array(w_scale.astype(np.float32), "W_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["W_int4", "W_scale"], ["W_dq"], name="w_dq", axis=0,
                                      block_size=block))
        weight = "W_dq"
    else:
        raise ValueError(kind)
    nodes.append(helper.make_node("MatMul", [act, weight], ["logits"], name="matmul"))
    graph = helper.make_graph(nodes, f"tiny_{kind}", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnxruntime refuses onnx 1.23's default IR version
    return model


def save_model(tmp_path: Path, kind: str = "fp32", name: str = "model.onnx", **kw) -> Path:
    path = tmp_path / name
    onnx.save(make_model(kind, **kw), str(path))
    return path


def save_calib(tmp_path: Path, n: int = 10, chw: tuple[int, ...] = CHW, dtype=np.float32, key: str = "images",
               name: str = "calib") -> Path:
    from safetensors.numpy import save_file

    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(1).normal(size=(n, *chw)).astype(dtype)
    save_file({key: arr}, str(d / "images.safetensors"))
    return d


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8", "int4"])
def test_fixture_graphs_are_valid_and_run_in_onnxruntime(kind: str) -> None:
    from dfq_deploy.runtime import ort_session

    model = make_model(kind)
    onnx.checker.check_model(model, full_check=True)
    sess = ort_session(model, optimize=False)
    x = np.random.default_rng(0).normal(size=(2, *CHW)).astype(np.float16 if kind == "fp16" else np.float32)
    (out,) = sess.run(None, {"input": x})
    assert out.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(out))


# --- importing never needs TensorRT -----------------------------------------------------------------------
def test_importing_the_module_does_not_import_tensorrt() -> None:
    code = ("import sys, dfq_deploy.export.tensorrt, dfq_deploy.runtime; "
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_tensorrt_module_imports_tensorrt_and_only_inside_functions() -> None:
    pkg = Path(__import__("dfq_deploy").__file__).parent
    found: list[tuple[str, bool]] = []
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "tensorrt" or n.startswith("tensorrt.") for n in names):
                p, in_function = node, False
                while p in parents:
                    p = parents[p]
                    in_function |= isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef)
                found.append((str(path.relative_to(pkg)), in_function))
    assert found, "expected require_tensorrt to import tensorrt"
    others = sorted({f for f, _ in found} - {str(Path("export") / "tensorrt.py")})
    assert not others, (f"{others} import tensorrt: only dfq_deploy/export/tensorrt.py may (use its "
                        "require_tensorrt() or tensorrt_version())")
    assert all(inside for _, inside in found), "tensorrt must be imported inside functions only"


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_require_tensorrt_names_how_to_install() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    assert str(info.value) == TRT_MISSING_MESSAGE
    assert isinstance(info.value, DfqError)
    assert "dfq-deploy[trt]" in str(info.value) and "JetPack" in str(info.value)


def test_gpu_available_agrees_with_cuda_runtime() -> None:
    cudart = pytest.importorskip("cuda.bindings.runtime")
    err, count = cudart.cudaGetDeviceCount()
    ok, reason = gpu_available()
    assert ok == (int(err) == 0 and count > 0)
    assert reason
    if not ok and int(err) != 0:
        assert err.name in reason


# --- plans ------------------------------------------------------------------------------------------------
def test_plan_for_int8_qdq_graph_is_strongly_typed_without_flags(tmp_path: Path) -> None:
    path = save_model(tmp_path, "int8")
    plan = plan_build(path, "int8")
    assert plan.strongly_typed is True
    assert plan.builder_flags == ()
    assert plan.graph_quant == "int8"
    assert plan.calibrator is None
    assert plan.profile == ShapeProfile("input", (1, *CHW), (8, *CHW), (32, *CHW))
    assert Path(plan.output) == tmp_path / "model.engine"
    assert plan.min_trt_version == "10.0"  # opset 21 is beyond TensorRT 8.6's parser
    assert any("opset 21" in n for n in plan.notes)
    best = plan_build(path, "best")
    assert best.strongly_typed and best.builder_flags == ()


def test_int8_qdq_graph_at_opset_17_needs_tensorrt_8_6(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", opset=17), "int8", batch="2,4,16")
    assert plan.min_trt_version == "8.6"
    assert plan.profile.batch == (2, 4, 16)


def test_plan_for_int4_graph_needs_tensorrt_10(tmp_path: Path) -> None:
    path = save_model(tmp_path, "int4")
    plan = plan_build(path, "int4", workspace_mb=256, output=tmp_path / "out" / "w4.engine")
    assert plan.strongly_typed and plan.builder_flags == ()
    assert plan.graph_quant == "int4"
    assert plan.min_trt_version == "10.0"
    assert plan.workspace_mb == 256
    assert plan.output == str(tmp_path / "out" / "w4.engine")
    with pytest.raises(DfqError, match="--precision int4"):
        plan_build(path, "int8")


@pytest.mark.parametrize(("precision", "flags"), [("fp16", ("FP16",)), ("fp32", ()), ("best", ("FP16",))])
def test_plan_for_float_graph(tmp_path: Path, precision: str, flags: tuple[str, ...]) -> None:
    plan = plan_build(save_model(tmp_path, "fp32"), precision)
    assert plan.strongly_typed is False
    assert plan.builder_flags == flags
    assert plan.graph_quant == "none"
    assert plan.min_trt_version == "10.0"  # opset 21


def test_float16_graph_is_strongly_typed(tmp_path: Path) -> None:
    path = save_model(tmp_path, "fp16")
    plan = plan_build(path, "fp16")
    assert plan.strongly_typed and plan.builder_flags == ()
    with pytest.raises(DfqError, match="float16"):
        plan_build(path, "fp32")


def test_int8_on_float_graph_without_calibrator_names_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(DfqError) as info:
        plan_build(save_model(tmp_path, "fp32"), "int8")
    msg = str(info.value)
    assert "export --bits 8" in msg and "--calibrator synthetic --calib-from" in msg


def test_int4_on_float_graph_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="--bits 4"):
        plan_build(save_model(tmp_path, "fp32"), "int4")


def test_float_precision_on_qdq_graph_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="--precision int8"):
        plan_build(save_model(tmp_path, "int8"), "fp16")


def test_int8_with_calibrator_on_float_graph_is_implicit_int8(tmp_path: Path, caplog) -> None:
    calib = save_calib(tmp_path)
    with caplog.at_level("WARNING"):
        plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic", calib_from=calib,
                          calib_batch_size=4)
    assert plan.strongly_typed is False
    assert plan.builder_flags == ("INT8",)
    assert plan.calibrator == CalibratorSettings(str(calib), str(tmp_path / "model.calib.cache"), 4)
    assert plan.max_trt_major == 10
    assert "deprecated" in caplog.text
    best = plan_build(save_model(tmp_path, "fp32"), "best", calibrator="synthetic", calib_from=calib,
                      calib_cache=tmp_path / "c.cache")
    assert best.builder_flags == ("FP16", "INT8")
    assert best.calibrator is not None and best.calibrator.cache_file == str(tmp_path / "c.cache")


def test_calibrator_on_qdq_graph_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="already has INT8 Q/DQ"):
        plan_build(save_model(tmp_path, "int8"), "int8", calibrator="synthetic", calib_from=save_calib(tmp_path))


def test_calibrator_argument_errors(tmp_path: Path) -> None:
    path = save_model(tmp_path, "fp32")
    calib = save_calib(tmp_path, n=3)
    with pytest.raises(DfqError, match="--calib-from"):
        plan_build(path, "int8", calibrator="synthetic")
    with pytest.raises(DfqError, match="only used with --calibrator"):
        plan_build(path, "int8", calib_from=calib)
    with pytest.raises(DfqError, match="choose one of synthetic"):
        plan_build(path, "int8", calibrator="entropy", calib_from=calib)
    with pytest.raises(DfqError, match="fp16"):
        plan_build(path, "fp16", calibrator="synthetic", calib_from=calib)
    with pytest.raises(DfqError, match="larger than the 3 saved images"):
        plan_build(path, "int8", calibrator="synthetic", calib_from=calib, calib_batch_size=8)
    wrong = save_calib(tmp_path, chw=(3, 8, 8), name="wrong")
    with pytest.raises(DfqError, match=r"\[3, 4, 4\]"):
        plan_build(path, "int8", calibrator="synthetic", calib_from=wrong, calib_batch_size=2)


def test_bad_precision_is_an_error(tmp_path: Path) -> None:
    path = save_model(tmp_path, "fp32")
    with pytest.raises(DfqError, match="choose one of int8, int4, fp16, best, fp32"):
        plan_build(path, "int16")
    plan = plan_build(path, "fp16")
    with pytest.raises(DfqError, match="precision 'bf16'"):
        EnginePlan.from_dict({**plan.to_dict(), "precision": "bf16"})


def test_plan_runs_the_tensorrt_rules_linter(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match=r"TensorRT rule.*signed"):
        plan_build(save_model(tmp_path, "int8", bad_zero_point=True), "int8")


def test_missing_or_unreadable_onnx(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="not found"):
        plan_build(tmp_path / "nope.onnx", "fp16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not an onnx file")
    with pytest.raises(DfqError, match="not a readable ONNX"):
        plan_build(bad, "fp16")


def test_fixed_batch_and_dynamic_image_size(tmp_path: Path) -> None:
    fixed = save_model(tmp_path, "fp32", batch=4, name="fixed.onnx")
    assert plan_build(fixed, "fp16").profile.batch == (4, 4, 4)
    assert plan_build(fixed, "fp16", batch="4").profile.batch == (4, 4, 4)
    with pytest.raises(DfqError, match="fixed batch of 4"):
        plan_build(fixed, "fp16", batch=(1, 8, 32))
    model = make_model("fp32")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    info = inspect_onnx(model)
    assert info.input_shape == (None, 3, None, 4)
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DfqError, match="dynamic non-batch"):
        plan_build(path, "fp16")


def test_inspect_onnx(tmp_path: Path) -> None:
    info = inspect_onnx(make_model("int4"))
    assert (info.input_name, info.input_shape, info.input_dtype) == ("input", (None, *CHW), "float32")
    assert info.has_qdq and info.has_int4 and info.graph_quant == "int4"
    assert info.opset == 21 and info.outputs == ("logits",)
    assert inspect_onnx(make_model("fp32")).graph_quant == "none"
    assert inspect_onnx(make_model("int8")).graph_quant == "int8"


def test_plan_json_round_trip(tmp_path: Path) -> None:
    calib = save_calib(tmp_path)
    plan = plan_build(save_model(tmp_path, "fp32"), "best", calibrator="synthetic", calib_from=calib,
                      timing_cache=tmp_path / "timing.cache", batch=(1, 4, 8), workspace_mb=512)
    text = plan.to_json()
    data = json.loads(text)
    assert data["builder_flags"] == ["FP16", "INT8"]
    assert data["profile"] == {"input_name": "input", "min": [1, 3, 4, 4], "opt": [4, 3, 4, 4],
                               "max": [8, 3, 4, 4]}
    assert data["calibrator"]["batch_size"] == 8
    again = EnginePlan.from_json(text)
    assert again == plan
    assert EnginePlan.from_json(again.to_json()) == plan
    qdq = plan_build(save_model(tmp_path, "int8", name="q.onnx"), "int8")
    assert EnginePlan.from_json(qdq.to_json()) == qdq


def test_plan_validation_errors(tmp_path: Path) -> None:
    good = plan_build(save_model(tmp_path, "int8"), "int8").to_dict()
    with pytest.raises(DfqError, match="unknown keys"):
        EnginePlan.from_dict({**good, "fp8": True})
    with pytest.raises(DfqError, match="must not be set on a strongly typed"):
        EnginePlan.from_dict({**good, "builder_flags": ["INT8"]})
    with pytest.raises(DfqError, match="unknown builder flag"):
        EnginePlan.from_dict({**good, "strongly_typed": False, "builder_flags": ["FP8"]})
    with pytest.raises(DfqError, match="min <= opt <= max"):
        EnginePlan.from_dict({**good, "profile": {**good["profile"], "min": [64, 3, 4, 4]}})
    with pytest.raises(DfqError, match="only the batch"):
        EnginePlan.from_dict({**good, "profile": {**good["profile"], "max": [32, 3, 8, 8]}})
    with pytest.raises(DfqError, match="workspace"):
        EnginePlan.from_dict({**good, "workspace_mb": 0})
    with pytest.raises(DfqError, match="overwrite the ONNX"):
        EnginePlan.from_dict({**good, "output": good["onnx"]})
    with pytest.raises(DfqError, match="calibrator needs a weakly typed"):
        EnginePlan.from_dict({**good, "calibrator": {"calib_from": "d", "cache_file": "c", "batch_size": 2}})
    missing = dict(good)
    del missing["profile"]
    with pytest.raises(DfqError, match="incomplete"):
        EnginePlan.from_dict(missing)
    with pytest.raises(DfqError, match="not valid JSON"):
        EnginePlan.from_json("{")


def test_parse_batch_range() -> None:
    assert parse_batch_range("1,8,32") == (1, 8, 32)
    assert parse_batch_range(" 2, 2, 4 ") == (2, 2, 4)
    assert parse_batch_range("8") == (8, 8, 8)
    assert parse_batch_range([1, 2, 3]) == (1, 2, 3)
    for bad in ("8,1,32", "0,1,2", "a,b,c", "1,2", ""):
        with pytest.raises(DfqError, match="--batch"):
            parse_batch_range(bad)


def test_check_trt_version(tmp_path: Path) -> None:
    int4 = plan_build(save_model(tmp_path, "int4"), "int4")
    with pytest.raises(DfqError, match=r"needs TensorRT >= 10\.0, found 8\.6\.1"):
        check_trt_version("8.6.1", int4)
    check_trt_version("10.3.0.30", int4)
    calib = plan_build(save_model(tmp_path, "fp32", name="f.onnx"), "int8", calibrator="synthetic",
                       calib_from=save_calib(tmp_path), calib_batch_size=2)
    check_trt_version("10.3.0", calib)
    with pytest.raises(DfqError) as info:
        check_trt_version("11.0.0", calib)
    assert "QDQ route" in str(info.value) and "export --bits 8" in str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_network_mode_falls_back_to_int8_flag_without_strong_typing(tmp_path: Path) -> None:
    qdq = plan_build(save_model(tmp_path, "int8", opset=17), "int8")
    assert resolve_network_mode(qdq, has_strongly_typed_flag=True) == (True, ())
    assert resolve_network_mode(qdq, has_strongly_typed_flag=False) == (False, ("INT8",))
    fp16 = plan_build(save_model(tmp_path, "fp32", name="f.onnx"), "fp16")
    assert resolve_network_mode(fp16, has_strongly_typed_flag=False) == (False, ("FP16",))


# --- calibration batching and caches ----------------------------------------------------------------------
def test_calibration_batcher_drops_the_partial_batch() -> None:
    images = np.arange(10 * 48, dtype=np.float64).reshape(10, *CHW)
    b = CalibrationBatcher(images, 4)
    assert (len(b), b.dropped, b.count) == (2, 2, 0)
    assert b.shape == (4, *CHW)
    assert b.nbytes == 4 * 48 * 4
    first = b.next_batch()
    assert first is not None
    assert first.dtype == np.float32 and first.flags["C_CONTIGUOUS"] and first.shape == (4, *CHW)
    np.testing.assert_array_equal(first, images[:4].astype(np.float32))
    second = b.next_batch()
    assert second is not None
    np.testing.assert_array_equal(second, images[4:8].astype(np.float32))
    assert b.next_batch() is None
    assert b.count == 2
    b.reset()
    assert b.count == 0
    again = b.next_batch()
    assert again is not None
    np.testing.assert_array_equal(again, first)
    assert [x[0, 0, 0, 0] for x in b] == [0.0, 4 * 48.0]  # iterating restarts from the first batch


def test_calibration_batcher_errors() -> None:
    with pytest.raises(DfqError, match="fewer than one batch"):
        CalibrationBatcher(np.zeros((3, *CHW), np.float32), 4)
    with pytest.raises(DfqError, match=r"\[N, C, H, W\]"):
        CalibrationBatcher(np.zeros((3, 4, 4), np.float32), 1)
    with pytest.raises(DfqError, match=">= 1"):
        CalibrationBatcher(np.zeros((3, *CHW), np.float32), 0)


def test_cache_read_write(tmp_path: Path) -> None:
    assert read_cache(None) is None
    path = tmp_path / "sub" / "calib.cache"
    assert read_cache(path) is None
    write_cache(path, b"TRT-1234-EntropyCalibration2\n")
    assert read_cache(path) == b"TRT-1234-EntropyCalibration2\n"
    write_cache(path, memoryview(b"second"))
    assert read_cache(path) == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["calib.cache"]  # no temp files left
    path.write_bytes(b"")
    assert read_cache(path) is None


def test_load_calib_images(tmp_path: Path) -> None:
    d = save_calib(tmp_path, n=6)
    arr = load_calib_images(d, input_shape=(1, *CHW))
    assert arr.shape == (6, *CHW) and arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"]
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(arr, load_file(str(d / "images.safetensors"))["images"])
    with pytest.raises(DfqError, match=r"images are \[3, 4, 4\].*needs \[3, 8, 8\]"):
        load_calib_images(d, input_shape=(3, 8, 8))


def test_load_calib_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="folder not found"):
        load_calib_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfqError, match="no images.safetensors"):
        load_calib_images(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "images.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DfqError, match="not a readable safetensors"):
        load_calib_images(corrupt)
    with pytest.raises(DfqError, match="no 'images' tensor"):
        load_calib_images(save_calib(tmp_path, key="x", name="wrongkey"))
    with pytest.raises(DfqError, match="float32"):
        load_calib_images(save_calib(tmp_path, dtype=np.float64, name="f64"))
    with pytest.raises(DfqError, match=r"expected \[N, 3, H, W\]"):
        load_calib_images(save_calib(tmp_path, chw=(4, 4), name="rank3"))
    from safetensors.numpy import save_file

    nan = tmp_path / "nan"
    nan.mkdir()
    save_file({"images": np.full((2, *CHW), np.nan, np.float32)}, str(nan / "images.safetensors"))
    with pytest.raises(DfqError, match="NaN"):
        load_calib_images(nan)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_trt_entry_points_need_tensorrt(tmp_path: Path) -> None:
    from dfq_deploy.export.tensorrt import build_engine, make_int8_calibrator

    batcher = CalibrationBatcher(np.zeros((4, *CHW), np.float32), 2)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        make_int8_calibrator(batcher, tmp_path / "c.cache")
    plan = plan_build(save_model(tmp_path, "int8"), "int8")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        build_engine(plan)
    assert not Path(plan.output).exists()


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


def test_trt_severity_level() -> None:
    import logging

    assert trt_severity_level("Severity.ERROR") == logging.ERROR
    assert trt_severity_level("INTERNAL_ERROR") == logging.CRITICAL
    assert trt_severity_level("WARNING") == logging.WARNING
    assert trt_severity_level("INFO") == logging.DEBUG
    assert trt_severity_level("VERBOSE") < logging.DEBUG


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
    from dfq_deploy.export.tensorrt import build_engine
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
    from dfq_deploy.export.tensorrt import build_engine
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
    from dfq_deploy.export.tensorrt import build_engine

    plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic",
                      calib_from=save_calib(tmp_path, n=16), calib_batch_size=4, batch="1,4,8")
    assert build_engine(plan).is_file()
    assert plan.calibrator is not None and read_cache(plan.calibrator.cache_file)
