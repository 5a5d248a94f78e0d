"""The parity check in both directions: correct exports of every family pass, sabotaged graphs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import DATA_CONFIG_KEY, save_onnx, to_onnx
from dfq_deploy.export.parity import FLOAT_RTOL, measure_parity, parity_probes, require_parity
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.quant.recipe import quantize_
from tests.export import sabotage

DEPLOYABLE = ["W8A8", "W4A16", "W3A16"]
SLOW = pytest.mark.slow


def _fast_first(params: list[tuple], fast: set[tuple]) -> list:
    """``params`` with every case outside ``fast`` marked slow (``pytest -m slow`` runs them)."""
    return [p if p in fast else pytest.param(*p, marks=SLOW) for p in params]


def _quantized(spec: ModelSpec, preset: str, calib: torch.Tensor, seed: int = 0,
               dtype: str = "fp16") -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    model = create_model(spec)
    quantize_(model, PRESETS[preset], calib, held=calib[:8], seed=seed)
    return model, to_onnx(model, dtype=dtype)


def _parity(model, proto, calib, n_probes=128, seed=0):
    return measure_parity(model, proto, {"calibration": calib, "held_back": parity_probes(calib, n_probes, seed)})


FAST_FAMILY_CASES = {(f, "W8A8", "fp16") for f in TINY_CONFIGS} | {("swin", "W4A16", "fp16"), ("deit", "W8A8", "fp32")}


@pytest.mark.parametrize("family, preset, dtype", _fast_first(
    [(f, p, d) for f in TINY_CONFIGS for p in DEPLOYABLE for d in ("fp16", "fp32")], FAST_FAMILY_CASES))
def test_correct_export_of_every_family_passes(family, preset, dtype):
    name, kwargs = TINY_CONFIGS[family]
    spec = ModelSpec(name, kwargs=dict(kwargs), random_weights=True)
    probe = create_model(spec)
    c, h, w = data_config(probe)["input_size"]
    calib = torch.randn(16, c, h, w, generator=torch.Generator().manual_seed(3))
    model, proto = _quantized(spec, preset, calib, dtype=dtype)
    assert lint_onnx(proto) == []
    par = _parity(model, proto, calib)
    assert par["passed"], par["structure"]
    assert par["graph_dtype"] == dtype and par["null"]["dtype"] == {"fp16": "float16", "fp32": "float64"}[dtype]
    assert par["calibration"]["disagreeing"] == par["held_back"]["disagreeing"] == 0
    st = par["structure"]
    assert st["weights"]["graph"] == st["weights"]["model"] > 0
    if preset == "W8A8":
        assert st["activation_qdq"]["graph"] == st["activation_qdq"]["model"] > 0
        assert par["tolerance"] > FLOAT_RTOL  # activation rounding is measured, not assumed
    else:
        assert st["activation_qdq"]["model"] == 0
        if dtype == "fp32":
            assert par["held_back"]["max_error"] < FLOAT_RTOL  # weight-only: only float rounding differs
        else:  # FP16 arithmetic on fixed integer weights: FP16 rounding only (measured: <= 3e-3)
            assert par["held_back"]["max_error"] < 1e-2


@torch.no_grad()
def near_ties(model: torch.nn.Module, n: int, seed: int, steps: int = 16) -> torch.Tensor:
    """Images on the decision boundary between two classes: bisection along the line between two noise images
    the model labels differently (the case of dfqvit's low-confidence detail images, made exact)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = data_config(model)["input_size"]
    pool = torch.randn(8 * n, c, h, w, generator=g)
    labels = model(pool).argmax(-1)
    a = pool[:n]
    partner = [int(torch.nonzero(labels != labels[i])[i % int((labels != labels[i]).sum())]) for i in range(n)]
    b = pool[partner]
    lo, hi = torch.zeros(n, 1, 1, 1), torch.ones(n, 1, 1, 1)
    label_a = model(a).argmax(-1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        same = (model((1 - mid) * a + mid * b).argmax(-1) == label_a).view(-1, 1, 1, 1)
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return (1 - lo) * a + lo * b


@pytest.fixture(scope="module")
def bundled() -> ModelSpec:
    return ModelSpec()


@pytest.mark.parametrize("preset, seed", _fast_first(
    [(p, s) for p in DEPLOYABLE for s in (0, 1, 2)], set()))  # the fast set checks W8A8 on near ties below
def test_bundled_model_on_near_ties_passes(bundled, preset, seed):
    torch.manual_seed(seed)
    calib = near_ties(create_model(bundled), 32, seed)  # calibrated on the float model's near ties
    model, proto = _quantized(bundled, preset, calib, seed)
    ties = near_ties(model, 32, seed + 100)  # and checked on the quantized model's own
    ref = model(ties).detach().numpy()
    top2 = np.sort(ref, -1)[:, -2:]
    # ties up to the activation grid: the margin is a few percent of the logit scale (the ORT error is ~1%)
    assert np.median(top2[:, 1] - top2[:, 0]) < 0.05 * np.median(ref.std(-1))
    par = measure_parity(model, proto, {"calibration": calib, "near_ties": ties,
                                        "held_back": parity_probes(calib, 64, seed)})
    assert par["passed"], {k: par[k] for k in ("calibration", "near_ties", "held_back", "structure")}


@pytest.fixture(scope="module")
def bundled_graphs(bundled):
    """The bundled model's W8A8 graph calibrated on near ties (the issue's case) and its W4A16 graph on noise."""
    calib = {"W8A8": near_ties(create_model(bundled), 32, 0),
             "W4A16": torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return {p: (*_quantized(bundled, p, x), x) for p, x in calib.items()}


CASES = [(kind, preset, k) for kind, presets in {
    "layer_scale": ("W8A8", "W4A16"), "channel_scale": ("W8A8", "W4A16"), "transposed": ("W8A8", "W4A16"),
    "zero_point": ("W8A8",), "missing_qdq": ("W8A8",), "block_shift": ("W4A16",),
}.items() for preset in presets for k in ((0, -1) if kind == "missing_qdq" else (0,))]


@pytest.mark.parametrize("preset", ["W8A8", "W4A16"])
def test_unbroken_graphs_pass(bundled_graphs, preset):
    model, proto, calib = bundled_graphs[preset]
    assert _parity(model, proto, calib)["passed"]  # the graphs the sabotage tests break pass the same check


@pytest.mark.parametrize("kind, preset, k", CASES)
def test_sabotaged_graph_is_refused(bundled_graphs, kind, preset, k):
    model, proto, calib = bundled_graphs[preset]
    broken = sabotage.SABOTAGES[kind](proto, k)
    par = _parity(model, broken, calib, n_probes=32)
    assert not par["passed"]
    with pytest.raises(DfqError) as err:
        require_parity(par)
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    if kind == "zero_point":
        assert any("zero point" in str(v) for v in lint_onnx(broken))


@pytest.mark.parametrize("kind", ["layer_scale", "transposed"])
def test_logit_check_alone_catches_gross_faults(bundled_graphs, kind):
    model, proto, calib = bundled_graphs["W8A8"]
    par = _parity(model, sabotage.SABOTAGES[kind](proto, 0), calib)
    assert par["checks"] == {"logits": False, "structure": False}


def test_api_file_is_deployable(tmp_path, tiny_model, image_folder):
    from dfq_deploy.export.evaluate import evaluate_onnx, onnx_data_config

    x = torch.randn(8, 3, 32, 32)
    from dfq_deploy.quant.qmodel import batches_loop, quantize

    quantize(tiny_model, PRESETS["W8A8"], batches_loop(x))
    path = save_onnx(to_onnx(tiny_model), tmp_path / "m.onnx")
    assert any(p.key == DATA_CONFIG_KEY for p in __import__("onnx").load(str(path)).metadata_props)
    assert onnx_data_config(path)["input_size"] == tuple(data_config(tiny_model)["input_size"])
    assert evaluate_onnx(path, image_folder, progress=False)["n"] == 20


def test_float16_null_uses_the_graphs_weights_and_leaves_the_model_alone():
    from dfq_deploy.export.parity import rounding_null, run_torch
    from dfq_deploy.quant.qmodel import quant_linears

    name, kwargs = TINY_CONFIGS["deit"]
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model, _ = _quantized(ModelSpec(name, kwargs=dict(kwargs), random_weights=True), "W4A16", calib)
    before = {n: lin.weight.detach().clone() for n, lin in quant_linears(model)}
    ref = run_torch(model, calib)
    null16 = rounding_null(model, calib, ref, dtype=torch.float16)
    assert all(lin.weight_quantizer.enabled and torch.equal(lin.weight, before[n]) for n, lin in quant_linears(model))
    assert np.array_equal(run_torch(model, calib), ref)
    # float16 arithmetic moves logits by FP16 rounding (~1e-3 of the logit scale), far more than float64 does
    null64 = rounding_null(model, calib, ref, dtype=torch.float64)
    assert null16["dtype"] == "float16" and 1e-4 < null16["max"] < 1e-2
    assert null64["max"] < null16["max"] / 10
