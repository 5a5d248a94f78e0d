"""The export job with reparameterisation, reconstruction and correction: report, plot, atomic outputs."""

from __future__ import annotations

import json

import pytest

import dfq_deploy.pipeline as pipeline
from dfq_deploy.config import CorrectionConfig
from dfq_deploy.errors import DfqError
from dfq_deploy.models import ModelSpec
from dfq_deploy.pipeline import export_model
from tests.conftest import TINY_KWARGS, export_options


def _opts(out, **kw):
    spec = ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True)
    base = dict(model=spec, bits=8, output=out, calib="noise", num_samples=8, parity_threshold=0.8, progress=False)
    return export_options(**{**base, **kw})


def test_export_with_every_stage(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    report = export_model(_opts(out, correct="bias", reparam=True, reconstruct=True, reconstruct_iters=3,
                                plot=True))
    assert sorted(p.name for p in out.iterdir()) == ["correction.png", "model.onnx", "report.json"]
    assert (out / "correction.png").read_bytes()[:4] == b"\x89PNG"
    corr = json.loads((out / "report.json").read_text())["correction"]
    assert corr == json.loads(json.dumps(report["correction"]))
    assert corr["mode"] == "bias" and corr["reparam"] and corr["reconstruct"] and corr["plot"] == "correction.png"
    assert list(corr["stages"]) == ["quantized", "reconstructed", "corrected"]
    assert len(corr["blocks"]) == 2
    assert report["dtype"] == "fp16" and report["fp32_nodes"] == {}  # checked on the calibration images: all FP16
    for b in corr["blocks"]:
        assert {"nmse_before", "nmse_after", "cos_before", "cos_after", "mse_before", "mse_after"} <= set(b)
        assert b["nmse_before"] > 0 and 0.5 < b["cos_after"] <= 1.0
    assert len(corr["reconstruction"]["blocks"]) == 2 and len(corr["layers"]) == 8
    assert corr["reparam_range_ratio"]["after"] <= corr["reparam_range_ratio"]["before"]
    assert {"reparam_s", "reconstruct_s", "fit_s", "fold_s", "errors_quantized_s"} <= set(corr["timings"])
    assert "correction_s" in report["timings"] and report["parity"]["passed"]


def test_defaults_and_float_export(tmp_path):
    opts = _opts(tmp_path / "a", bits=32, calib="spdfq")
    assert opts.correction == CorrectionConfig() and opts.correction.mode == "diag" and not opts.plot
    report = export_model(opts)
    assert report["correction"] == {"mode": "none", "skipped": "float export"}
    assert report["calibration"]["source"] == "noise"  # parity inputs only: no synthesis for a float export
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.onnx", "report.json"]
    with pytest.raises(DfqError, match="--correct"):
        _opts(tmp_path / "b", correct="matrix")


def test_failure_after_writing_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "atomic_write_json", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        export_model(_opts(out, bits=4, correct="diag", plot=True))
    assert not out.exists()  # nothing written, and the folder the job made is gone
