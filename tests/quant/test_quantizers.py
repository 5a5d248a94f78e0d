import pytest
import torch

from dfq_deploy.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    fake_quant,
    fake_quant_affine,
    qrange,
    search_affine,
    search_scale,
)


def test_fake_quant_is_on_the_signed_grid():
    x = torch.linspace(-3, 3, 1001)
    scale = torch.tensor(0.05)
    q = fake_quant(x, scale, 4)
    ints = q / scale
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    lo, hi = qrange(4)
    assert (lo, hi) == (-8, 7)
    assert ints.min() == lo and ints.max() == hi


def test_round_half_to_even_like_onnx():
    scale = torch.tensor(1.0)
    assert fake_quant(torch.tensor([0.5, 1.5, 2.5, -0.5]), scale, 8).tolist() == [0.0, 2.0, 2.0, -0.0]


def test_straight_through_gradient():
    x = torch.randn(10, requires_grad=True)
    fake_quant(x, torch.tensor(0.1), 8).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_search_beats_minmax(bits):
    torch.manual_seed(0)
    x = torch.randn(16, 512) * torch.rand(16, 1)
    x[:, 0] = 20.0  # an outlier per row
    err = {}
    for method in ("minmax", "mse"):
        s = search_scale(x, bits, method).unsqueeze(-1)
        err[method] = (fake_quant(x, s, bits) - x).pow(2).mean()
    assert err["mse"] <= err["minmax"]
    assert (search_scale(x, bits, "mse") > 0).all()


def test_percentile_clips_below_max():
    x = torch.cat([torch.randn(1, 100_000), torch.tensor([[1000.0]])], 1)
    assert search_scale(x, 8, "percentile", 99.9) < search_scale(x, 8, "minmax")


def test_weight_quantizer_per_channel_and_blocks():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    pc = WeightQuantizer(8, None, "minmax")
    pc.calibrate(w)
    assert pc.scale.shape == (6,)
    assert torch.allclose(pc.scale, w.abs().amax(1) / 127)
    blk = WeightQuantizer(4, 8, "minmax")
    blk.calibrate(w)
    assert blk.scale.shape == (6, 2)
    ints = blk.integers(w)
    assert ints.min() >= -8 and ints.max() <= 7
    assert torch.allclose(blk(w), (ints.reshape(6, 2, 8) * blk.scale.unsqueeze(-1)).reshape(6, 16))
    with pytest.raises(ValueError, match="does not divide"):
        WeightQuantizer(4, 5).calibrate(w)


def test_act_quantizer_observes_then_quantizes():
    q = ActQuantizer(8, "minmax")
    x = torch.randn(4, 10) * 3
    q.observing = True
    assert torch.equal(q(x), x)  # observing passes through
    q.finalize()
    assert not q.observing
    assert torch.isclose(q.scale, x.abs().max() / 127)
    y = q(x)
    assert not torch.equal(y, x) and torch.allclose(y, x, atol=float(q.scale) / 2 + 1e-6)
    with pytest.raises(RuntimeError, match="saw no data"):
        ActQuantizer(8).finalize()


def test_log2_quantizer_gives_powers_of_two():
    q = ActQuantizer(4, log2=True)
    q.observing = True
    q(torch.rand(10))
    q.finalize()
    y = q(torch.tensor([1.0, 0.5, 0.3, 0.01, 0.0]))
    assert y.tolist() == pytest.approx([1.0, 0.5, 0.25, 2**-7, 0.0])


def test_asymmetric_grid_gives_a_non_negative_tensor_every_level():
    x = torch.rand(10_000)  # softmax-like: non-negative
    scale, zp = search_affine(x, 3, "minmax")
    assert zp == 0 and torch.isclose(scale, x.max() / 7)
    y = fake_quant_affine(x, scale, zp, 3)
    assert len(torch.unique(y)) == 8  # all 2^3 levels used; the symmetric grid has 4 for x >= 0
    assert len(torch.unique(fake_quant(x, search_scale(x[None], 3, "minmax"), 3))) == 4
    sym_err = (fake_quant(x, search_scale(x[None], 3, "mse"), 3) - x).pow(2).mean()
    asym_err = (fake_quant_affine(x, *search_affine(x, 3, "mse"), 3) - x).pow(2).mean()
    assert asym_err < 0.5 * sym_err


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_asymmetric_grid_represents_zero_and_its_range(method):
    x = torch.randn(5000) * 2 + 1.5  # off-centre
    scale, zp = search_affine(x, 4, method, 99.9)
    assert 0 <= int(zp) <= 15 and float(zp) == int(zp)
    assert fake_quant_affine(torch.zeros(1), scale, zp, 4).item() == 0.0
    y = fake_quant_affine(x, scale, zp, 4)
    lo, hi = float(-zp * scale), float((15 - zp) * scale)
    assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6
    assert (y - x).abs()[(x > lo) & (x < hi)].max() <= scale / 2 + 1e-6  # inside the range: rounding only


def test_act_quantizer_asymmetric_and_fixed_range():
    q = ActQuantizer(4, "mse", asymmetric=True)
    q.observing = True
    q(torch.rand(100) * 3)
    q.finalize()
    assert q.zero_point.numel() == 1 and "asymmetric" in repr(q)
    y = q(torch.tensor([0.0, 1.0, 2.0]))
    assert y[0] == 0 and torch.allclose(y, torch.tensor([0.0, 1.0, 2.0]), atol=float(q.scale))
    fixed = ActQuantizer(8, "mse", asymmetric=True)
    fixed.fixed_range = (-2.0, 2.0)
    fixed.observing = True
    fixed(torch.randn(100) * 10)  # what is observed does not matter
    fixed.finalize()
    assert torch.isclose(fixed.scale, torch.tensor(4.0 / 255))
