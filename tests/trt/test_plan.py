"""Build plans: typing and flags per graph and precision, profiles, versions, JSON round trip (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.plan import CalibratorSettings, EnginePlan, ShapeProfile
from dfq_deploy.trt.planner import (
    check_trt_version,
    inspect_onnx,
    parse_batch_range,
    plan_build,
    resolve_network_mode,
)
from tests.trt.graphs import CHW, make_model, save_calib, save_model


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
