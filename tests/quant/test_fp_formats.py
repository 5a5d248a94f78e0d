"""FP8 and NVFP4 grids, quantizers and configs (issue #30)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.config import PRESETS, QuantConfig, preset_for_bits
from dfq_deploy.errors import DfqError
from dfq_deploy.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    fake_quant_nvfp4,
    round_fp4,
    round_fp8,
    search_scale,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _ort_qdq(x: np.ndarray, scale: float, elem: int) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear with a FLOAT8E4M3FN zero point, in an FP32/FP16 graph."""
    import onnxruntime as ort

    npdt = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[elem]
    s = numpy_helper.from_array(np.array(scale, dtype=npdt), "s")
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0])
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", elem, [None])],
                          [helper.make_tensor_value_info("y", elem, [None])], [s, zp])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(npdt)})[0]


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_fp8_matches_onnxruntime_bit_for_bit(elem):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 60, rng.standard_normal(50_000) * 1e-3,
                        [1e4, -1e4, 448 * 0.37 * 1.1, np.inf, -np.inf, 0.0]]).astype(np.float32)
    npdt = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    x = x.astype(npdt)
    scale = float(npdt(0.37))
    got = _ort_qdq(x, scale, elem).astype(np.float32)
    # ORT divides in FP32 (also in an FP16 graph) and saturates (inf -> 448): what fake_quant_fp8 computes
    ref = (round_fp8(torch.from_numpy(x.astype(np.float32)) / scale) * scale).to(torch.from_numpy(x).dtype).float()
    np.testing.assert_array_equal(got, ref.numpy())


def test_fp4_rounding_is_e2m1_nearest_even():
    v = torch.linspace(-8, 8, 4001)
    got = round_fp4(v)
    assert set(got.abs().unique().tolist()) <= set(E2M1)
    ref = torch.from_numpy(v.numpy().clip(-6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(got, ref)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # to the even code
    assert round_fp4(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_nvfp4_weight_quantizer_two_level():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[3, :16] = 0  # an all-zero block stays zero
    wq = WeightQuantizer(4, 16, "minmax", fmt="nvfp4")
    wq.calibrate(w)
    assert wq.scale.shape == (32, 4)
    assert torch.isclose(wq.global_scale, w.abs().max() / (6 * 448))
    f8 = wq.block_scales_fp8()
    assert torch.equal(f8, round_fp8(f8))  # the block scales are FP8 values
    vals = wq.integers(w)
    assert set(vals.abs().unique().tolist()) <= set(E2M1)
    deq = (vals.reshape(32, 4, 16) * wq.scale.unsqueeze(-1)).reshape(32, 64)
    assert torch.equal(deq, wq(w))
    assert torch.all(deq[3, :16] == 0)
    # each block's max maps to (about) 6: relative error of the largest entries small
    assert float((wq(w) - w).abs().max()) <= float(wq.scale.max()) * 1.0 + 1e-6


def test_nvfp4_activation_dynamic_blocks():
    x = torch.randn(2, 5, 32) * torch.logspace(-2, 1, 32)
    q = ActQuantizer(4, "minmax", fmt="nvfp4")
    q.observing = True
    q(x)
    q.finalize()
    assert torch.isclose(q.scale, x.abs().max() / (6 * 448))
    y = q(x)
    assert torch.equal(y, fake_quant_nvfp4(x, q.scale))
    # error at most half the largest E2M1 step (2 in [4, 6]) of a block scale amax_b / 6 (FP8-rounded up to 1/16)
    blocks = x.reshape(2, 5, 2, 16)
    bound = blocks.abs().amax(-1, keepdim=True) / 6 * (17 / 16)
    assert torch.all((y - x).reshape(2, 5, 2, 16).abs() <= bound + 1e-6)


def test_fp8_weight_scale_is_amax_over_448_and_mse_on_fp8_grid():
    w = torch.randn(8, 32)
    wq = WeightQuantizer(8, None, "minmax", fmt="fp8")
    wq.calibrate(w)
    assert torch.allclose(wq.scale, w.abs().amax(1) / 448)
    assert set(round_fp8(wq.integers(w)).flatten().tolist()) == set(wq.integers(w).flatten().tolist())
    x = torch.randn(1, 4096) ** 3
    mse, mx = search_scale(x, 8, "mse", fmt="fp8"), search_scale(x, 8, "minmax", fmt="fp8")
    assert float(mse) <= float(mx) + 1e-12


def test_presets_and_labels():
    fp8, nv, nvw = PRESETS["FP8"], PRESETS["NVFP4"], PRESETS["NVFP4-W4A16"]
    assert fp8.deployable and fp8.runs_in_ort and fp8.formats == {"fp8"}
    assert nv.deployable and not nv.runs_in_ort and nv.formats == {"nvfp4"}
    assert not nvw.deployable and not nvw.runs_in_ort  # TensorRT documents weight-only for INT4 only
    assert preset_for_bits("fp8") is fp8 and preset_for_bits("nvfp4") is nv and preset_for_bits("8").name == "W8A8"
    # the new fields stay out of the cache keys of the existing presets
    assert "w_format" not in PRESETS["W8A8"].key_dict() and "a_format" not in PRESETS["W4A4"].key_dict()
    assert fp8.key_dict()["w_format"] == "fp8"
    assert QuantConfig.from_json(fp8.to_json()) == fp8


@pytest.mark.parametrize("changes, match", [
    (dict(w_format="fp9"), "unknown"),
    (dict(w_format="fp8", w_bits=4), "8 bits"),
    (dict(a_format="nvfp4"), "4 bits"),
    (dict(w_format="nvfp4", w_bits=4, w_granularity="blockwise", block_size=32), "blocks of 16"),
    (dict(a_format="fp8", a_grid="asymmetric"), "symmetric"),
    (dict(a_format="nvfp4", a_bits=4, a_scope="matmul", a_range="minmax"), "Linear inputs only"),
])
def test_invalid_format_configs(changes, match):
    with pytest.raises(DfqError, match=match):
        QuantConfig(**changes)


def test_per_layer_override_to_fp8():
    cfg = PRESETS["W8A8"].with_(layers={"blocks.0.*": "FP8", "blocks.1.mlp.fc2": {"a_format": "fp8",
                                                                                   "w_format": "fp8"}})
    assert cfg.for_layer("blocks.0.attn.qkv").w_format == "fp8"
    assert cfg.for_layer("blocks.1.mlp.fc2").a_format == "fp8"
    assert cfg.for_layer("blocks.2.mlp.fc2").w_format == "int"
    assert cfg.deployable and cfg.formats == {"int", "fp8"}


def test_onnx_checker_knows_fp4_from_opset_23():
    def types(opset: int) -> list[str]:
        return onnx.defs.get_schema("DequantizeLinear", opset).type_constraints[0].allowed_type_strs

    assert "tensor(float4e2m1)" in types(23) and "tensor(float4e2m1)" not in types(21)
