import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config, transformer_blocks
from dfq_deploy.quant.qmodel import (
    QuantConv2d,
    QuantLinear,
    _forward_groups,
    act_quantizers,
    attention_modules,
    batches_loop,
    prepare_,
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
    assert not isinstance(tiny_model.head, QuantLinear)  # the head stays float: TensorRT's only weight-only form
    # is INT4 blocked, and a 10-class head is too small to be worth it (lint refuses an INT8 weight-only Gemm)


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


def _family(family):
    name, kwargs = TINY_CONFIGS[family]
    torch.manual_seed(0)
    return create_model(ModelSpec(name, kwargs=dict(kwargs), random_weights=True)).eval()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_sequential_ranges_follow_the_quantized_model_block_by_block(family):
    x = torch.randn(8, 3, 32, 32)
    fm, sm = _family(family), _family(family)
    quantize(fm, PRESETS["W4A4"], batches_loop(x, 4))
    quantize(sm, PRESETS["W4A4"].with_(a_calib="sequential"), batches_loop(x, 4))
    groups = _forward_groups(sm, batches_loop(x, 4))
    blocks = transformer_blocks(sm)
    assert len(groups) == len(blocks)  # one group a block; quantizers outside blocks join a neighbour
    assert sum(len(g) for g in groups) == len(act_quantizers(sm))
    f_scales, s_scales = dict(act_quantizers(fm)), dict(act_quantizers(sm))
    first = groups[0][0][0]  # the first quantizer in forward order sees the float model's input either way
    assert torch.equal(f_scales[first].scale, s_scales[first].scale)
    last = groups[-1][-1][0]  # downstream of quantized blocks: a different range
    assert not torch.equal(f_scales[last].scale, s_scales[last].scale)
    for name, q in act_quantizers(sm):
        assert q.calibrated and q.enabled and not q.observing, name


def test_sequential_group_order_follows_the_forward_pass(tiny_model):
    x = torch.randn(4, 3, 32, 32)
    prepare_(tiny_model, PRESETS["W4A4-paper"])
    names = [[n for n, _ in g] for g in _forward_groups(tiny_model, batches_loop(x))]
    assert names[0][0] == "patch_embed.proj.input_quantizer" and names[-1][-1] == "head.input_quantizer"
    assert all(n.startswith("blocks.1.") for n in names[1][:-1])
    assert names[0][1:4] == ["blocks.0.attn.qkv.input_quantizer", "blocks.0.attn.q_quant", "blocks.0.attn.k_quant"]


def test_paper_protocol_quantizes_patch_embedding_and_head_at_8_bits(tiny_model):
    x = torch.randn(8, 3, 32, 32) * 5  # far outside the pixel range: the embedding input keeps its known range
    cfg = PRESETS["W4A4-paper"]
    assert not cfg.deployable and cfg.a_grid == "asymmetric" and cfg.attn_log2 and cfg.io_bits == 8
    quantize(tiny_model, cfg, batches_loop(x))
    conv, head = tiny_model.patch_embed.proj, tiny_model.head
    assert isinstance(conv, QuantConv2d) and isinstance(head, QuantLinear)
    assert conv.weight_quantizer.bits == head.weight_quantizer.bits == head.input_quantizer.bits == 8
    dcfg = data_config(tiny_model)
    lo = min(-m / s for m, s in zip(dcfg["mean"], dcfg["std"], strict=True))
    hi = max((1 - m) / s for m, s in zip(dcfg["mean"], dcfg["std"], strict=True))
    iq = conv.input_quantizer
    assert torch.isclose(iq.scale, torch.tensor((hi - lo) / 255))
    w = conv.quantized_weight()
    assert not torch.equal(w, conv.weight)
    per_channel = conv.weight_quantizer.scale
    assert per_channel.shape == (conv.out_channels,)
    assert torch.allclose(w.flatten(1) / per_channel[:, None], torch.round(w.flatten(1) / per_channel[:, None]),
                          atol=1e-4)
    assert all(q.asymmetric or q.log2 for _, q in act_quantizers(tiny_model))
    assert all(a.p_quant.log2 for a in attention_modules(tiny_model))
    with torch.no_grad():
        out = tiny_model(x[:2])
    assert torch.isfinite(out).all()


def test_student_scales_round_trip_with_zero_points(tiny_model):
    from dfq_deploy.quant.student import QuantStudent

    x = torch.randn(8, 3, 32, 32)
    student = QuantStudent(tiny_model, PRESETS["W4A3-paper"])
    saved = student.calibrate(x)
    assert saved.shape == (2, len(student.quantizers))  # scales and zero points
    with torch.no_grad():
        want = student(x)
    other = QuantStudent(tiny_model, PRESETS["W4A3-paper"])
    other.calibrate(torch.randn(8, 3, 32, 32) * 3)  # other ranges, then restored
    other.load_scales(saved)
    with torch.no_grad():
        assert torch.equal(other(x), want)
    symmetric = QuantStudent(tiny_model, PRESETS["W4A3"]).calibrate(x)
    assert symmetric.dim() == 1  # the format checkpoints had before zero points existed
