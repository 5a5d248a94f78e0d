"""Data-free estimate, per-unit sensitivity and the mixed-precision search."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dfq_deploy.config import PRESETS, QuantConfig
from dfq_deploy.errors import DfqError
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.quant.estimate import estimate_accuracy, estimate_probes, soft_drop
from dfq_deploy.quant.qmodel import batches_loop, quant_units, quantize, set_quant_enabled_
from dfq_deploy.quant.search import AutoConfig, auto_quant_config, mixed_config, solve
from dfq_deploy.quant.sensitivity import _BlockReplay, _unit_quantizers, probe_logits, sensitivity_table


def _tiny(family: str = "deit", seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    name, kwargs = TINY_CONFIGS[family]
    torch.manual_seed(seed)
    model = create_model(ModelSpec(name, kwargs=dict(kwargs), random_weights=True))
    c, h, w = data_config(model)["input_size"]
    return model, torch.randn(16, c, h, w, generator=torch.Generator().manual_seed(3))


def test_soft_drop_is_the_float_confidence_lost():
    fp = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]))
    q = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # disagrees on the first input only
    np.testing.assert_allclose(soft_drop(fp, q), [0.5, 0.0, 0.0], atol=1e-12)
    est = estimate_accuracy(fp, q)
    assert est["agreement"] == pytest.approx(2 / 3) and est["predicted_drop"] == pytest.approx(50 / 3)
    assert est["interval"][0] <= est["predicted_drop"] <= est["interval"][1] and est["flagged"]
    same = estimate_accuracy(fp, fp)
    assert same["predicted_drop"] == 0 and same["kl"] == pytest.approx(0, abs=1e-12) and not same["flagged"]


def test_estimate_probes_are_new_deterministic_mixes():
    calib = torch.randn(8, 3, 8, 8)
    a, b = estimate_probes(calib, 32, seed=1), estimate_probes(calib, 32, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, estimate_probes(calib, 32, seed=2))
    assert min(float((a - c).abs().max()) for c in calib) > 0.05  # never a calibration image


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_block_replay_gives_the_full_forward(family, monkeypatch):
    from dfq_deploy.quant import sensitivity

    monkeypatch.setattr(sensitivity, "_BATCH", 16)
    model, calib = _tiny(family)
    probes = estimate_probes(calib, 24)  # two batches, the second partial
    replay = _BlockReplay(model, probes)
    qm = copy.deepcopy(model)
    quantize(qm, PRESETS["W8A8"], batches_loop(calib))
    set_quant_enabled_(qm, False)
    start = replay.block_of(qm)
    assert max(start.values()) > 0  # some units do start later
    for unit, _ in quant_units(model):
        qs = _unit_quantizers(qm, unit)
        for q in qs:
            q.enabled = True
        np.testing.assert_array_equal(replay.logits(qm, start[unit]), probe_logits(qm, probes))
        for q in qs:
            q.enabled = False


def test_sensitivity_table_orders_formats_and_is_cached(tmp_path):
    model, calib = _tiny()
    probes = estimate_probes(calib, 64)
    formats = ("FP16", "W8A8", "W4A16", "W2A16")
    table = sensitivity_table(model, calib, probes, formats, tmp_path)
    assert table["cached"] is None and len(table["units"]) == len(quant_units(model))
    for row in table["units"]:
        f = row["formats"]
        if row["kind"] == "attn":
            assert set(f) == {"FP16", "W8A8"}  # weight-only formats leave an attention group float
        else:
            assert f["FP16"]["kl"] == 0 and f["W2A16"]["kl"] > f["W4A16"]["kl"]
            assert f["W4A16"]["bytes"] == f["W2A16"]["bytes"] < f["W8A8"]["bytes"] < f["FP16"]["bytes"]
    again = sensitivity_table(model, calib, probes, formats, tmp_path)
    assert again["cached"] and again["units"] == table["units"]
    with pytest.raises(DfqError, match="unknown preset"):
        sensitivity_table(model, calib, probes, ("W9A9",), tmp_path)


def _table() -> dict:
    """Two Linears of 100 weights: unit a is sensitive, unit b is not."""
    def fmts(kls):
        return {f: {"kl": kl, "drop": 0.0, "bits": b, "bytes": 100 * b / 8}
                for (f, b), kl in zip((("FP16", 16.0), ("W4A16", 4.0), ("W2A16", 2.0)), kls, strict=True)}
    return {"units": [{"name": "a", "kind": "linear", "params": 100, "formats": fmts([0.0, 0.1, 1.0])},
                      {"name": "b", "kind": "linear", "params": 100, "formats": fmts([0.0, 0.01, 0.02])}],
            "seconds": 0.0, "cached": None}


def test_solve_spends_bits_where_they_matter():
    auto = AutoConfig(budget="bits:3", formats=("FP16", "W4A16", "W2A16"), cache_dir=None)
    assert solve(_table(), auto) == {"a": "W4A16", "b": "W2A16"}
    assert solve(_table(), auto.with_(budget="bits:10")) == {"a": "FP16", "b": "W4A16"}
    assert solve(_table(), auto.with_(budget="size:0.000075")) == {"a": "W4A16", "b": "W2A16"}  # 75 bytes
    with pytest.raises(DfqError, match=r"below the least .* allow \(2.00 bits\)"):
        solve(_table(), auto.with_(budget="bits:1.5"))
    assert solve(_table(), auto.with_(budget="drop:1"), kl_cap=0.05) == {"a": "FP16", "b": "W2A16"}


@pytest.mark.parametrize("budget, match", [
    ("bits", "KIND:VALUE"), ("speed:3", "KIND:VALUE"), ("bits:x", "must be a number"), ("bits:-1", "positive"),
    ("latency:3", "--cost-table"),
])
def test_bad_budgets_are_refused_in_one_line(budget, match):
    with pytest.raises(DfqError, match=match):
        AutoConfig(budget=budget)


def test_auto_config_round_trips():
    auto = AutoConfig(budget="bits:3.5", formats=("FP16", "W4A16"))
    assert AutoConfig.from_json(auto.to_json()) == auto


def test_auto_search_meets_the_budget_and_makes_a_mixed_config(tmp_path):
    model, calib = _tiny()
    before = copy.deepcopy(model.state_dict())
    cfg, rep = auto_quant_config(model, calib, AutoConfig(budget="bits:3", probes=32, cache_dir=str(tmp_path)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left alone
    assert rep["effective_bits"] <= 3 + 1e-9 and len(rep["units"]) == len(quant_units(model))
    assert isinstance(cfg, QuantConfig) and cfg.deployable and cfg.layers
    assert {u["unit"]: u["format"] for u in rep["units"] if u["format"] != "FP16"} == cfg.layers
    drop_cfg, drop_rep = auto_quant_config(model, calib, AutoConfig(budget="drop:0.5", probes=32,
                                                                     cache_dir=str(tmp_path)))
    assert drop_rep["sensitivity_cached"]  # one table serves every budget
    assert drop_rep["predicted_without_correction"]["predicted_drop"] <= 0.5
    assert mixed_config({"x": "FP16"}, "n").is_float


def test_latency_budget_uses_the_measured_cost_table_only():
    cost = {"source": "recorded: bench on a test GPU", "rest_ms": 1.0,
            "units": {"a": {"FP16": 3.0, "W4A16": 2.0, "W2A16": 2.0}, "b": {"FP16": 3.0, "W4A16": 2.0, "W2A16": 2.0}}}
    auto = AutoConfig(budget="latency:6", formats=("FP16", "W4A16", "W2A16"), cost_table="costs.json",
                      cache_dir=None)
    assert solve(_table(), auto, cost_table=cost) == {"a": "FP16", "b": "W4A16"}  # 1 + 3 + 2 ms
    assert solve(_table(), auto.with_(budget="latency:5"), cost_table=cost) == {"a": "W4A16", "b": "W4A16"}
    del cost["units"]["b"]["W2A16"]
    with pytest.raises(DfqError, match="no latency for b in W2A16"):
        solve(_table(), auto, cost_table=cost)


def test_activation_bits_budget_counts_each_activation_quantizer():
    def fmts(kls):
        return {f: {"kl": kl, "drop": 0.0, "bits": 4.0, "bytes": 50.0}
                for f, kl in zip(("W4A8", "W4A4"), kls, strict=True)}
    table = {"units": [{"name": "l", "kind": "linear", "params": 100, "formats": fmts([0.0, 1.0])},
                       {"name": "att", "kind": "attn", "params": 0, "formats": fmts([0.0, 0.1])}],
             "seconds": 0.0, "cached": None}
    auto = AutoConfig(budget="abits:4.8", formats=("W4A8", "W4A4"), cache_dir=None)
    assert solve(table, auto) == {"l": "W4A8", "att": "W4A4"}  # (8 + 4 x 4) / 5 = 4.8 bits
    with pytest.raises(DfqError, match=r"\(4.00 bits\)"):
        solve(table, auto.with_(budget="abits:3"))
