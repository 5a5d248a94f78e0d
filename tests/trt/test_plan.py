"""Build plans: typing and flags per graph and precision, profiles, versions, JSON round trip (CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.plan import MIN_TRT_VERSION, CalibratorSettings, EnginePlan, ShapeProfile
from dfq_deploy.trt.planner import (
    FP32_TYPED_WARNING,
    _decide,
    check_trt_version,
    inspect_onnx,
    plan_build,
)
from dfq_deploy.trt.profiles import parse_batch_sizes
from tests.trt.graphs import CHW, make_model, save_calib, save_model, vit_graph


# --- plans ------------------------------------------------------------------------------------------------
def test_plan_for_fp16_int8_qdq_graph_is_strongly_typed_without_flags(tmp_path: Path, caplog) -> None:
    path = save_model(tmp_path, "int8", dtype="fp16", batch="batch")
    with caplog.at_level("WARNING"):
        plan = plan_build(path, "int8")
    assert plan.strongly_typed is True
    assert plan.builder_flags == ()
    assert (plan.graph_quant, plan.graph_dtype) == ("int8", "fp16")
    assert plan.calibrator is None and plan.max_trt_major is None
    # one exact profile per default batch size, then the 1..32 range for every other size
    assert plan.profiles == tuple(ShapeProfile("input", (lo, *CHW), (opt, *CHW), (hi, *CHW))
                                  for lo, opt, hi in ((1, 1, 1), (8, 8, 8), (32, 32, 32), (1, 8, 32)))
    assert plan.batch_sizes == (1, 8, 32) and plan.image_shape == CHW and plan.input_name == "input"
    assert Path(plan.output) == tmp_path / "model.engine"
    assert plan.min_trt_version == MIN_TRT_VERSION == "10.0"
    assert FP32_TYPED_WARNING not in plan.notes and caplog.text == ""
    best = plan_build(path, "best", batch="2,4,16")
    assert best.strongly_typed and best.builder_flags == ()
    assert best.batch_table == [(2, 2, 2), (4, 4, 4), (16, 16, 16), (2, 4, 16)]
    exact = plan_build(path, "best", batch="16,1", range_profile=False)
    assert exact.batch_table == [(1, 1, 1), (16, 16, 16)] and all(p.exact for p in exact.profiles)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fp32_typed_quantized_graph_builds_with_a_warning(tmp_path: Path, caplog, kind: str) -> None:
    with caplog.at_level("WARNING"):
        plan = plan_build(save_model(tmp_path, kind), kind)
    assert plan.strongly_typed and plan.builder_flags == () and plan.graph_dtype == "fp32"
    assert FP32_TYPED_WARNING in plan.notes
    assert "re-export with --dtype fp16 (the default)" in caplog.text


def test_plan_for_int4_graph(tmp_path: Path) -> None:
    path = save_model(tmp_path, "int4", dtype="fp16")
    plan = plan_build(path, "int4", workspace_mb=256, output=tmp_path / "out" / "w4.engine")
    assert plan.strongly_typed and plan.builder_flags == ()
    assert (plan.graph_quant, plan.graph_dtype) == ("int4", "fp16")
    assert FP32_TYPED_WARNING not in plan.notes
    assert plan.workspace_mb == 256
    assert plan.output == str(tmp_path / "out" / "w4.engine")
    assert plan_build(path, "best").strongly_typed
    with pytest.raises(DfqError, match="--precision int4"):
        plan_build(path, "int8")


# (kind, dtype, precision, calibrated) -> (strongly_typed, flags) or the error's regex; hand-built real graphs
DECISIONS = [
    ("int8", "fp16", "int8", False, (True, ())),
    ("int8", "fp16", "best", False, (True, ())),
    ("int8", "fp32", "int8", False, (True, ())),
    ("int8", "fp16", "fp16", False, r"INT8 Q/DQ-quantized: build it with --precision int8, or .*--bits 16"),
    ("int8", "fp16", "fp32", False, r"--precision int8, or .*--bits 32"),
    ("int8", "fp16", "int4", False, "--bits 4 for int4"),
    ("int8", "fp16", "int8", True, "already has INT8 Q/DQ nodes"),
    ("int4", "fp16", "int4", False, (True, ())),
    ("int4", "fp16", "best", False, (True, ())),
    ("int4", "fp32", "int4", False, (True, ())),
    ("int4", "fp16", "fp16", False, "INT4 weights .*--precision int4, not fp16"),
    ("int4", "fp16", "best", True, "already has INT4 Q/DQ nodes"),
    ("fp16", "fp16", "fp16", False, (True, ())),
    ("fp16", "fp16", "best", False, (True, ())),
    ("fp16", "fp16", "fp32", False, r"FP16-typed: build it with --precision fp16.*--bits 32"),
    ("fp16", "fp16", "int8", True, r"FP16-typed and implicit INT8 calibration needs an FP32 .*--bits 32"),
    ("fp16", "fp16", "best", True, r"FP16-typed and implicit INT8 calibration"),
    ("fp32", "fp32", "fp32", False, (True, ())),
    ("fp32", "fp32", "best", False, (True, ())),
    ("fp32", "fp32", "fp16", False, re.escape("the graph is FP32-typed and TensorRT 11 has no FP16 flag: export an "
                                              "FP16 graph (dfq-deploy export --bits 16)")),
    ("fp32", "fp32", "int8", True, (False, ("FP16", "INT8"))),
    ("fp32", "fp32", "best", True, (False, ("FP16", "INT8"))),
    ("fp32", "fp32", "fp16", True, "--calibrator only applies to --precision int8 or best, not fp16"),
    ("fp32", "fp32", "int8", False, "needs Q/DQ nodes or a calibrator"),
    ("fp16", "fp16", "int4", False, "--bits 4"),
]


@pytest.mark.parametrize(("kind", "dtype", "precision", "calibrated", "expected"), DECISIONS)
def test_decision_table(kind: str, dtype: str, precision: str, calibrated: bool, expected) -> None:
    info = inspect_onnx(make_model(kind, dtype=dtype))
    assert info.graph_dtype == dtype and info.input_dtype == "float32"  # exported graphs keep a float32 input
    if isinstance(expected, str):
        with pytest.raises(DfqError, match=expected) as err:
            _decide(precision, info, calibrated)
        assert "\n" not in str(err.value)
        return
    decision = _decide(precision, info, calibrated)
    assert (decision.strongly_typed, decision.flags) == expected
    assert decision.notes  # every route says what it chose
    assert (FP32_TYPED_WARNING in decision.warnings) == (kind in ("int8", "int4") and dtype == "fp32")


def test_fp32_float_graph_best_is_strongly_typed_fp32_with_a_hint(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        plan = plan_build(save_model(tmp_path, "fp32"), "best")
    assert plan.strongly_typed and plan.builder_flags == () and plan.graph_dtype == "fp32"
    assert "--bits 16" in caplog.text
    assert plan_build(save_model(tmp_path, "fp32", name="b.onnx"), "fp32").notes == (
        "FP32 float graph: strongly typed, no precision flags",)


def test_fp16_float_graph_is_strongly_typed(tmp_path: Path) -> None:
    path = save_model(tmp_path, "fp16")
    plan = plan_build(path, "fp16")
    assert plan.strongly_typed and plan.builder_flags == () and plan.graph_dtype == "fp16"
    with pytest.raises(DfqError, match="FP16-typed"):
        plan_build(path, "fp32")


@pytest.fixture(scope="module")
def exported_w8a8() -> dict[str, onnx.ModelProto]:
    return {dtype: vit_graph("W8A8", dtype) for dtype in ("fp16", "fp32")}


def test_exported_vit_graphs_are_planned_by_their_compute_type(exported_w8a8) -> None:
    for dtype, proto in exported_w8a8.items():
        info = inspect_onnx(proto)
        assert (info.input_dtype, info.graph_dtype, info.graph_quant) == ("float32", dtype, "int8")
        decision = _decide("best", info, calibrated=False)
        assert decision.strongly_typed and decision.flags == ()
        assert (FP32_TYPED_WARNING in decision.warnings) == (dtype == "fp32")


def test_int8_on_float_graph_without_calibrator_names_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(DfqError) as info:
        plan_build(save_model(tmp_path, "fp32"), "int8")
    msg = str(info.value)
    assert "export --bits 8" in msg and "--calibrator synthetic --calib-from" in msg


def test_int8_with_calibrator_on_float_graph_is_implicit_int8(tmp_path: Path, caplog) -> None:
    calib = save_calib(tmp_path)
    with caplog.at_level("WARNING"):
        plan = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic", calib_from=calib,
                          calib_batch_size=4)
    assert plan.strongly_typed is False
    assert plan.builder_flags == ("FP16", "INT8")  # together, as trtexec --best
    assert plan.calibrator == CalibratorSettings(str(calib), str(tmp_path / "model.calib.cache"), 4)
    assert plan.max_trt_major == 10
    assert "deprecated since TensorRT 10.1" in caplog.text
    best = plan_build(save_model(tmp_path, "fp32"), "best", calibrator="synthetic", calib_from=calib,
                      calib_cache=tmp_path / "c.cache")
    assert best.builder_flags == ("FP16", "INT8") and not best.strongly_typed
    assert best.calibrator is not None and best.calibrator.cache_file == str(tmp_path / "c.cache")
    with pytest.raises(DfqError, match="needs an FP32 float graph"):
        plan_build(save_model(tmp_path, "fp16", name="h.onnx"), "int8", calibrator="synthetic", calib_from=calib)


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
    with pytest.raises(DfqError, match="choose one of int8, int4, fp8, fp4, fp16, best, fp32"):
        plan_build(path, "int16")
    plan = plan_build(path, "fp32")
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
    fixed = save_model(tmp_path, "fp16", batch=4, name="fixed.onnx")
    assert plan_build(fixed, "fp16").batch_table == [(4, 4, 4)]  # one size: no range profile
    assert plan_build(fixed, "fp16", batch="4").batch_table == [(4, 4, 4)]
    with pytest.raises(DfqError, match="fixed batch of 4"):
        plan_build(fixed, "fp16", batch=(1, 8, 32))
    model = make_model("fp32")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    info = inspect_onnx(model)
    assert info.input_shape == (None, 3, None, 4)
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DfqError, match="dynamic non-batch"):
        plan_build(path, "fp32")


def test_inspect_onnx(tmp_path: Path) -> None:
    info = inspect_onnx(make_model("int4"))
    assert (info.input_name, info.input_shape, info.input_dtype) == ("input", (None, *CHW), "float32")
    assert info.has_qdq and info.has_int4 and info.graph_quant == "int4"
    assert info.opset == 21 and info.outputs == ("logits",) and info.graph_dtype == "fp32"
    assert inspect_onnx(make_model("fp32")).graph_quant == "none"
    assert inspect_onnx(make_model("int8")).graph_quant == "int8"
    half = inspect_onnx(make_model("int4", dtype="fp16"))  # FP16 scales, float32 input with a Cast
    assert (half.input_dtype, half.graph_dtype, half.graph_quant) == ("float32", "fp16", "int4")


def test_plan_json_round_trip(tmp_path: Path) -> None:
    calib = save_calib(tmp_path)
    plan = plan_build(save_model(tmp_path, "fp32"), "best", calibrator="synthetic", calib_from=calib,
                      timing_cache=tmp_path / "timing.cache", batch=(1, 4, 8), workspace_mb=512)
    text = plan.to_json()
    data = json.loads(text)
    assert data["builder_flags"] == ["FP16", "INT8"] and data["graph_dtype"] == "fp32"
    assert data["profiles"][0] == {"input_name": "input", "min": [1, 3, 4, 4], "opt": [1, 3, 4, 4],
                                   "max": [1, 3, 4, 4]}
    assert data["profiles"][-1] == {"input_name": "input", "min": [1, 3, 4, 4], "opt": [4, 3, 4, 4],
                                    "max": [8, 3, 4, 4]}
    assert "profile" not in data and len(data["profiles"]) == 4
    assert data["calibrator"]["batch_size"] == 8
    again = EnginePlan.from_json(text)
    assert again == plan
    assert EnginePlan.from_json(again.to_json()) == plan
    qdq = plan_build(save_model(tmp_path, "int8", name="q.onnx", dtype="fp16"), "int8")
    assert EnginePlan.from_json(qdq.to_json()) == qdq and qdq.graph_dtype == "fp16"
    old = qdq.to_dict()
    del old["graph_dtype"]  # a plan written before graph_dtype existed reads as FP32-typed
    assert EnginePlan.from_dict(old).graph_dtype == "fp32"


def test_a_plan_with_one_profile_reads_as_before(tmp_path: Path) -> None:
    """Plans and build records written before per-batch profiles hold one ``profile`` (min 1, opt 8, max 32)."""
    new = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8").to_dict()
    old = {k: v for k, v in new.items() if k != "profiles"}
    old["profile"] = {"input_name": "input", "min": [1, 3, 4, 4], "opt": [8, 3, 4, 4], "max": [32, 3, 4, 4]}
    plan = EnginePlan.from_json(json.dumps(old))
    assert plan.profiles == (ShapeProfile("input", (1, *CHW), (8, *CHW), (32, *CHW)),)
    assert plan.batch_table == [(1, 8, 32)] and plan.batch_sizes == () and plan.image_shape == CHW
    assert EnginePlan.from_dict(plan.to_dict()) == plan  # written back in the new form
    with pytest.raises(DfqError, match="both 'profile' and 'profiles'"):
        EnginePlan.from_dict({**new, "profile": old["profile"]})


def test_plan_validation_errors(tmp_path: Path) -> None:
    good = plan_build(save_model(tmp_path, "int8"), "int8").to_dict()
    with pytest.raises(DfqError, match="unknown keys"):
        EnginePlan.from_dict({**good, "fp8": True})
    with pytest.raises(DfqError, match="must not be set on a strongly typed"):
        EnginePlan.from_dict({**good, "builder_flags": ["INT8"]})
    with pytest.raises(DfqError, match="unknown builder flag"):
        EnginePlan.from_dict({**good, "strongly_typed": False, "builder_flags": ["FP8"]})
    last = good["profiles"][-1]
    with pytest.raises(DfqError, match="min <= opt <= max"):
        EnginePlan.from_dict({**good, "profiles": [{**last, "min": [64, 3, 4, 4]}]})
    with pytest.raises(DfqError, match="only the batch"):
        EnginePlan.from_dict({**good, "profiles": [{**last, "max": [32, 3, 8, 8]}]})
    with pytest.raises(DfqError, match="one or more ShapeProfile"):
        EnginePlan.from_dict({**good, "profiles": []})
    with pytest.raises(DfqError, match="repeated profiles"):
        EnginePlan.from_dict({**good, "profiles": [last, last]})
    with pytest.raises(DfqError, match=r"every profile must be on input 'input' \[3, 4, 4\]"):
        EnginePlan.from_dict({**good, "profiles": [last, {**last, "input_name": "x"}]})
    with pytest.raises(DfqError, match="workspace"):
        EnginePlan.from_dict({**good, "workspace_mb": 0})
    with pytest.raises(DfqError, match="overwrite the ONNX"):
        EnginePlan.from_dict({**good, "output": good["onnx"]})
    with pytest.raises(DfqError, match="calibrator needs a weakly typed"):
        EnginePlan.from_dict({**good, "calibrator": {"calib_from": "d", "cache_file": "c", "batch_size": 2}})
    with pytest.raises(DfqError, match="only set for implicit INT8 calibration"):
        EnginePlan.from_dict({**good, "strongly_typed": False, "builder_flags": ["FP16"]})
    with pytest.raises(DfqError, match="only the calibrator route builds weakly typed"):
        EnginePlan.from_dict({**good, "strongly_typed": False})
    calib = {"calib_from": "d", "cache_file": "c", "batch_size": 2}
    float_calib = {**good, "graph_quant": "none", "strongly_typed": False, "builder_flags": ["FP16", "INT8"],
                   "calibrator": calib}
    assert EnginePlan.from_dict(float_calib).calibrator == CalibratorSettings("d", "c", 2)
    with pytest.raises(DfqError, match="calibrator needs an FP32-typed float graph"):
        EnginePlan.from_dict({**float_calib, "graph_dtype": "fp16"})
    with pytest.raises(DfqError, match="unknown graph_dtype"):
        EnginePlan.from_dict({**good, "graph_dtype": "bf16"})
    with pytest.raises(DfqError, match=r"min_trt_version 8\.6 is below 10\.0"):
        EnginePlan.from_dict({**good, "min_trt_version": "8.6"})
    missing = dict(good)
    del missing["profiles"]
    with pytest.raises(DfqError, match="incomplete"):
        EnginePlan.from_dict(missing)
    with pytest.raises(DfqError, match="not valid JSON"):
        EnginePlan.from_json("{")


def test_parse_batch_sizes() -> None:
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    assert parse_batch_sizes(" 2, 2, 4 ") == (2, 4)
    assert parse_batch_sizes("8") == (8,)
    assert parse_batch_sizes("32,1,8") == (1, 8, 32)  # sizes, not MIN,OPT,MAX: any order
    assert parse_batch_sizes([1, 2, 3]) == (1, 2, 3)
    for bad in ("0,1,2", "a,b,c", "", "-1"):
        with pytest.raises(DfqError, match="--batch"):
            parse_batch_sizes(bad)


@pytest.mark.parametrize("version", ["8.6.2", "8.6.1.6", "9.3.0.1"])
def test_tensorrt_before_10_is_refused_in_one_line(tmp_path: Path, version: str) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8")
    expected = (f"TensorRT {version} is not supported: dfq-deploy builds with TensorRT >= 10.0 (JetPack 6.1/6.2 ship "
                "10.3; JetPack 6.0's 8.6 cannot parse opset-21 graphs): upgrade JetPack or TensorRT")
    for p in (plan, None):
        with pytest.raises(DfqError) as info:
            check_trt_version(version, p)
        assert str(info.value) == expected


def test_check_trt_version(tmp_path: Path) -> None:
    for kind in ("int8", "int4", "fp16"):
        plan = plan_build(save_model(tmp_path, kind, name=f"{kind}.onnx", dtype="fp16"), "best")
        for version in ("10.0.1", "10.3.0.30", "11.0.0", "11.4.1"):
            check_trt_version(version, plan)
    calib = plan_build(save_model(tmp_path, "fp32", name="f.onnx"), "int8", calibrator="synthetic",
                       calib_from=save_calib(tmp_path), calib_batch_size=2)
    check_trt_version("10.3.0", calib)
    check_trt_version("10.16.1", calib)
    with pytest.raises(DfqError) as info:
        check_trt_version("11.0.0.1", calib)
    assert str(info.value) == ("TensorRT 11 has no calibrators (removed; deprecated since 10.1): use the QDQ route: "
                               "dfq-deploy export --bits 8, then dfq-deploy build model.onnx --precision int8")
    with pytest.raises(DfqError, match="cannot read the TensorRT version"):
        check_trt_version("unknown", calib)
