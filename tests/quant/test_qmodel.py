import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.quant.qmodel import (
    QuantLinear,
    act_quantizers,
    attention_modules,
    batches_loop,
    quant_disabled,
    quantize,
)


def test_quantize_wraps_block_linears_only(tiny_model):
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_model(x)
    quantize(tiny_model, PRESETS["W8A8"], batches_loop(x))
    qlins = [m for m in tiny_model.modules() if isinstance(m, QuantLinear)]
    assert len(qlins) == 2 * 4  # qkv, proj, fc1, fc2 per block
    assert not isinstance(tiny_model.head, QuantLinear)
    assert len(act_quantizers(tiny_model)) == 2 * (4 + 4)  # Linear inputs + q, k, p, v
    assert all(q.calibrated for _, q in act_quantizers(tiny_model))
    with torch.no_grad():
        out = tiny_model(x)
        with quant_disabled(tiny_model):
            fp = tiny_model(x)
    assert torch.allclose(fp, ref, atol=1e-6)  # disabling quantizers restores full precision
    assert not torch.allclose(out, ref)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.2


def test_weight_only_has_no_activation_quantizers(tiny_model):
    quantize(tiny_model, PRESETS["W4A16"])
    assert act_quantizers(tiny_model) == []
    blocks = [m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear) and n.startswith("blocks")]
    assert len(blocks) == 8 and all(m.weight_quantizer.block_size in (64, 128) for m in blocks)
    assert isinstance(tiny_model.head, QuantLinear)  # weight-only presets keep the head as INT8 per channel
    assert tiny_model.head.weight_quantizer.bits == 8 and tiny_model.head.weight_quantizer.block_size is None
    assert tiny_model.head.input_quantizer is None


def test_linear_scope_skips_attention(tiny_model):
    cfg = PRESETS["W4A4"].with_(a_scope="linear")
    quantize(tiny_model, cfg, batches_loop(torch.randn(4, 3, 32, 32)))
    assert not any(hasattr(a, "q_quant") for a in attention_modules(tiny_model))


def test_activation_presets_need_data(tiny_model):
    with pytest.raises(ValueError, match="forward_loop"):
        quantize(tiny_model, PRESETS["W8A8"])


def test_lower_bits_hurt_more(tiny_model):
    import copy

    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_model(x)
    errs = {}
    for name in ("W8A8", "W4A4", "W3A3"):
        m = quantize(copy.deepcopy(tiny_model), PRESETS[name], batches_loop(x))
        with torch.no_grad():
            errs[name] = float((m(x) - ref).norm() / ref.norm())
    assert errs["W8A8"] < errs["W4A4"] < errs["W3A3"]
