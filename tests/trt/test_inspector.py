"""Reading engine-inspector JSON: integer layers, fused attention, summaries (CPU); real engines (GPU).

The samples are hand-written in the TensorRT 10.x ``ProfilingVerbosity.DETAILED`` layout (keys as Polygraphy
reads them; formats, tactic and Myelin names as shown in NVIDIA/TensorRT issues 3665, 4167 and 4397). They are
not recorded from an engine built here: this machine has no GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.trt.build import build_engine
from dfq_deploy.trt.inspector import (
    engine_layers,
    fused_attention_layers,
    integer_layers,
    layer_datatypes,
    layer_summary,
    parse_engine_information,
)
from dfq_deploy.trt.planner import plan_build
from tests.trt.graphs import HAS_TRT, requires_gpu, save_model


def _io(name: str, fmt: str, dims: list[int]) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": fmt}


QKV = {  # an INT8 GEMM: Int8 in, Half out, an i8 tactic
    "Name": "/blocks.0/attn/qkv/MatMul", "LayerType": "CaskGemmMatrixMultiply",
    "Inputs": [_io("/blocks.0/norm1/Add_output_0", "Row major linear Int8 format", [8, 65, 192])],
    "Outputs": [_io("/blocks.0/attn/qkv/MatMul_output_0", "Row major linear FP16 format", [8, 65, 576])],
    "TacticName": "sm87_xmma_gemm_i8f16_i8i32_f32_tn_n_tilesize64x64x64_stage6_warpsize2x2x1_tensor16x8x32",
    "TacticValue": "0x2a9b1ccb5ab0b5b6", "StreamId": 0, "Metadata": "[ONNX Layer: /blocks.0/attn/qkv/MatMul]",
}
MHA = {  # a fused attention kernel chosen by Myelin: formats Half, the tactic names it
    "Name": "_gemm_mha_v2_myl0_12", "LayerType": "kgen",
    "Inputs": [_io("__myl_Tran_myl0_10", "Half", [8, 3, 65, 64]), _io("__myl_Tran_myl0_11", "Half", [8, 3, 65, 64])],
    "Outputs": [_io("__myl_Mha_myl0_12", "Half", [8, 3, 65, 64])],
    "TacticName": "_gemm_mha_v2_0x5b7f3a0e6c2d1f48", "StreamId": 0, "Metadata": "",
}
LAYERNORM = {  # an FP16 Myelin layer: no integer format, no mha
    "Name": "__myl_LnCast_myl0_3", "LayerType": "kgen",
    "Inputs": [_io("input_cast", "Half", [8, 65, 192])], "Outputs": [_io("ln_out", "Half", [8, 65, 192])],
    "TacticName": "__myl_LnCast_0x9e0d5f1c2b3a4d67", "StreamId": 0, "Metadata": "[ONNX Layer: /blocks.0/norm1]",
}
REFORMAT = {  # the FP32 input Cast: Float in, Half out
    "Name": "Reformatting CopyNode for Input Tensor 0 to /Cast", "LayerType": "Reformat",
    "Inputs": [_io("input", "Row major linear FP32", [8, 3, 32, 32])],
    "Outputs": [_io("input_fp16", "Row major linear FP16 format", [8, 3, 32, 32])],
    "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x00000000000003e8", "StreamId": 0,
}
IMPLICIT_INT8 = {  # an INT8 conv with a vectorized format and no i8 in its tactic name
    "Name": "/patch_embed/proj/Conv", "LayerType": "CaskConvolution",
    "Inputs": [_io("x", "Channel major INT8 format where channel % 32 == 0", [8, 3, 32, 32])],
    "Outputs": [_io("y", "Channel major FP16 format where channel % 8 == 0", [8, 192, 8, 8])],
    "TacticName": "sm87_xmma_fprop_implicit_gemm_indexed_f16f16_f16f16_f16_nhwckrsc_nhwc", "StreamId": 0,
}
UINT8_IO = {"Name": "cast_u8", "LayerType": "Cast", "Inputs": [_io("a", "UInt8", [1])],
            "Outputs": [_io("b", "Int32", [1])], "TacticName": "cast_int64_kernel"}
ENGINE_JSON = json.dumps({"Layers": [REFORMAT, LAYERNORM, QKV, MHA, IMPLICIT_INT8, UINT8_IO],
                          "Bindings": ["input", "logits"]})


def test_parse_detailed_engine_information() -> None:
    layers = parse_engine_information(ENGINE_JSON)
    assert [la["Name"] for la in layers] == [d["Name"] for d in (REFORMAT, LAYERNORM, QKV, MHA, IMPLICIT_INT8,
                                                                 UINT8_IO)]
    assert layer_datatypes(QKV) == ["Row major linear Int8 format", "Row major linear FP16 format"]


def test_names_only_engine_information_warns(caplog) -> None:
    with caplog.at_level("WARNING"):
        layers = parse_engine_information(json.dumps({"Layers": ["conv1", "gemm2"], "Bindings": ["input"]}))
    assert layers == [{"Name": "conv1"}, {"Name": "gemm2"}]
    assert "ProfilingVerbosity.DETAILED" in caplog.text
    assert integer_layers(layers) == [] and fused_attention_layers(layers) == []


def test_unreadable_engine_information() -> None:
    with pytest.raises(DfqError, match="unreadable JSON"):
        parse_engine_information("{not json")
    with pytest.raises(DfqError, match="no 'Layers' list"):
        parse_engine_information(json.dumps({"Bindings": []}))


def test_integer_layers() -> None:
    layers = parse_engine_information(ENGINE_JSON)
    assert [la["Name"] for la in integer_layers(layers)] == [QKV["Name"], IMPLICIT_INT8["Name"]]
    by_tactic = {"Name": "gemm", "LayerType": "gemm", "TacticName": "sm80_xmma_gemm_i8i8_i8i32_f32_tn_n"}
    assert integer_layers([by_tactic]) == [by_tactic]
    int4 = {"Name": "w4", "Inputs": [_io("w", "Int4", [192, 576])], "Outputs": [_io("o", "Half", [8, 576])]}
    assert integer_layers([int4]) == [int4]
    split = {"Name": "trt11", "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "Row major linear"}]}
    assert integer_layers([split]) == [split]  # a TensorRT 11-style split key is read too
    assert integer_layers([UINT8_IO, LAYERNORM, REFORMAT, MHA]) == []


def test_fused_attention_layers() -> None:
    layers = parse_engine_information(ENGINE_JSON)
    assert fused_attention_layers(layers) == [MHA]
    fmha = {"Name": "{ForeignNode[/blocks.1/attn/MatMul.../blocks.1/attn/MatMul_1]}", "LayerType": "Myelin",
            "TacticName": "fmha_v2_flash_attention_fp16_64_64_S_64_sm86_kernel"}
    assert fused_attention_layers([fmha, QKV]) == [fmha]
    assert fused_attention_layers([{"Name": "MHA_fused", "TacticName": None}])


def test_layer_summary() -> None:
    summary = layer_summary(parse_engine_information(ENGINE_JSON))
    assert (summary["layers"], summary["integer"], summary["fused_attention"]) == (6, 2, 1)
    assert summary["datatypes"]["Half"] == 5
    assert layer_summary([]) == {"layers": 0, "integer": 0, "fused_attention": 0, "datatypes": {}}


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_engine_layers_needs_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        engine_layers(tmp_path / "model.engine")


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed")
def test_engine_layers_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="engine file not found"):
        engine_layers(tmp_path / "missing.engine")


@pytest.mark.gpu
@requires_gpu
def test_engine_layers_of_a_built_engine(tmp_path: Path) -> None:
    engine_path = build_engine(plan_build(save_model(tmp_path, "fp16"), "fp16", batch="1,2,4", workspace_mb=256))
    from_path = engine_layers(engine_path)
    assert from_path == engine_layers(engine_path.read_bytes())
    assert from_path and all("LayerType" in la for la in from_path)  # DETAILED: more than names
    assert layer_summary(from_path)["layers"] == len(from_path)
