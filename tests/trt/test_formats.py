"""Where FP8 and NVFP4 engines run: the compute-capability table and its one-line refusal (recorded GPUs, no GPU)."""

from __future__ import annotations

import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.formats import format_error, parse_cc, require_format

# gpu_info()-style records of real GPUs (name as CUDA reports it, compute capability from developer.nvidia.com)
GPUS = {
    "a100": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
    "orin": {"name": "Orin", "compute_capability": "8.7"},
    "l4": {"name": "NVIDIA L4", "compute_capability": "8.9"},
    "h100": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
    "b200": {"name": "NVIDIA B200", "compute_capability": "10.0"},
    "thor_cuda12": {"name": "NVIDIA Thor", "compute_capability": "10.1"},
    "thor_cuda13": {"name": "NVIDIA Thor", "compute_capability": "11.0"},
    "rtx5090": {"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0"},
}
RUNS = {"fp8": {"l4", "h100", "b200", "thor_cuda12", "thor_cuda13", "rtx5090"},
        "fp4": {"b200", "thor_cuda12", "thor_cuda13", "rtx5090"}}


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("gpu", list(GPUS))
def test_table(fmt, gpu):
    assert (format_error(fmt, GPUS[gpu]) is None) == (gpu in RUNS[fmt])


def test_one_line_refusals_name_gpu_and_format():
    assert format_error("fp8", GPUS["a100"]) == ("FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell, "
                                                 "Thor); NVIDIA A100-SXM4-80GB (8.0) has none: build int8 or fp16")
    msg = format_error("fp4", GPUS["h100"])
    assert msg.startswith("NVFP4 needs compute capability >= 10.0") and "NVIDIA H100 80GB HBM3 (9.0)" in msg
    assert "\n" not in msg and "fp8" in msg
    with pytest.raises(DfqError, match="Orin"):
        require_format("fp8", GPUS["orin"])


def test_other_formats_and_unknown_gpus_pass():
    assert format_error("int8", GPUS["a100"]) is None and format_error("fp8", {}) is None
    assert parse_cc("8.9") == (8, 9) and parse_cc((10, 1)) == (10, 1) and parse_cc(None) is None


@pytest.mark.parametrize("preset, quant, min_trt", [("FP8", "fp8", "10.0"), ("NVFP4", "fp4", "10.8")])
def test_fp_graphs_plan_strongly_typed_without_flags(tmp_path, preset, quant, min_trt):
    import onnx

    from dfq_deploy.trt.planner import check_trt_version, plan_build
    from tests.trt.graphs import vit_graph

    path = tmp_path / "m.onnx"
    onnx.save(vit_graph(preset), str(path))
    plan = plan_build(path, quant)
    assert plan.strongly_typed and plan.builder_flags == () and plan.graph_quant == quant
    assert plan.min_trt_version == min_trt and plan_build(path, "best").graph_quant == quant
    with pytest.raises(DfqError, match=f"--precision {quant}"):
        plan_build(path, "int8")
    if quant == "fp4":
        with pytest.raises(DfqError, match="10.8"):
            check_trt_version("10.7.0", plan)


def test_fp8_precision_on_an_int8_graph_names_the_export(tmp_path):
    import onnx

    from dfq_deploy.trt.planner import plan_build
    from tests.trt.graphs import vit_graph

    path = tmp_path / "m.onnx"
    onnx.save(vit_graph(None), str(path))
    with pytest.raises(DfqError, match="export --bits fp8"):
        plan_build(path, "fp8")
