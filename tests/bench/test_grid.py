"""The accuracy grid (dfq_deploy.bench.grid) on its --smoke path with a tiny random model, so it cannot rot."""

from __future__ import annotations

import json

import timm
from safetensors.torch import save_file

from dfq_deploy.bench import grid
from tests.conftest import make_image_folder


def test_smoke_grid(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    mod = grid
    kwargs = "img_size=32,patch_size=4,depth=1,num_classes=10"
    ckpt = tmp_path / "tiny.safetensors"  # fixed random weights, so the resumed run finds the same cache key
    save_file(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=1,
                                num_classes=10).state_dict(), str(ckpt))
    result = mod.main(["--smoke", "--model", "deit_t", "--model-kwargs", kwargs,
                       "--checkpoint", str(ckpt), "--data", str(data), "--calib-dir", str(data),
                       "--sources", "noise,real",
                       "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    cells = {(c["preset"], c["source"]): c for c in result["cells"]}
    assert set(cells) == {("FP32", "-"), ("W4A16", "noise"), ("W4A4", "noise"), ("W4A16", "real"), ("W4A4", "real")}
    assert cells[("W4A16", "noise")]["measured_on"] == "onnxruntime (fp16 graph)"  # the graph that ships
    assert cells[("W4A4", "real")]["measured_on"].startswith("simulated")
    assert all(0.0 <= c["top1"] <= 1.0 for c in result["cells"])
    assert result["n_eval"] == 8
    stem = tmp_path / "res" / "accuracy-deit_t-smoke"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["summary"] == result["summary"]
    md = stem.with_suffix(".md").read_text()
    assert "W4A4*" in md and "| noise |" in md and "| real |" in md
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # Every cell and calibration set was saved as it finished: a second run only assembles them.
    saved_cells = sorted(p.name for p in (tmp_path / "cache").glob("*/cells-*/cell-*.json"))
    assert len(saved_cells) == 5 and len(list((tmp_path / "cache").glob("*/calib-*.pt"))) == 2
    again = mod.main(["--smoke", "--model", "deit_t", "--model-kwargs", kwargs, "--checkpoint", str(ckpt),
                      "--data", str(data), "--calib-dir", str(data), "--sources", "noise,real",
                      "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    assert again["cells"] == result["cells"]  # wall times included: nothing was recomputed

    # A changed setting misses the cache; a source variant passes its options to the synthesizer.
    other = mod.main(["--smoke", "--model", "deit_t", "--model-kwargs", kwargs, "--checkpoint", str(ckpt),
                      "--data", str(data), "--calib-dir", str(data), "--sources", "noise,psaq:kde_points=8",
                      "--correct", "bias", "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    cells = {(c["preset"], c["source"]): c for c in other["cells"]}
    assert cells[("W4A16", "noise")]["correct"] == "bias" and cells[("W4A16", "noise")] != \
        next(c for c in result["cells"] if (c["preset"], c["source"]) == ("W4A16", "noise"))
    assert ("W4A4", "psaq:kde_points=8") in cells
    assert len(list((tmp_path / "cache").glob("*/calib-psaq:kde_points=8-0-*.pt"))) == 1

    # Once the method's revision is bumped (its defaults changed), its saved sets and cells are not reused.
    from dfq_deploy.synth import METHODS

    monkeypatch.setattr(METHODS.get("psaq"), "revision", 1)
    bumped = mod.main(["--smoke", "--model", "deit_t", "--model-kwargs", kwargs, "--checkpoint", str(ckpt),
                       "--data", str(data), "--calib-dir", str(data), "--sources", "noise,psaq:kde_points=8",
                       "--correct", "bias", "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    assert len(list((tmp_path / "cache").glob("*/calib-psaq:kde_points=8@r1-0-*.pt"))) == 1
    assert len(list((tmp_path / "cache").glob("*/cells-*/cell-*-psaq:kde_points=8@r1-0.json"))) == 2
    redone = {(c["preset"], c["source"]): c for c in bumped["cells"]}
    assert redone[("W4A4", "psaq:kde_points=8")]["times"] != cells[("W4A4", "psaq:kde_points=8")]["times"]
    assert redone[("W4A16", "noise")] == cells[("W4A16", "noise")]  # other sources keep their cells


def test_gap_closed():
    mod = grid
    rows = [{"preset": "W4A4", "source": s, "top1_mean": v}
            for s, v in [("noise", 0.50), ("real", 0.70), ("spdfq", 0.66), ("psaq", 0.55)]]
    rows.append({"preset": "W8A8", "source": "noise", "top1_mean": 0.7})  # no real cell: no gap
    got = {(g["preset"], g["source"]): g for g in mod.gap_closed(rows)}
    assert set(got) == {("W4A4", "spdfq"), ("W4A4", "psaq")}
    assert abs(got[("W4A4", "spdfq")]["closed"] - 0.8) < 1e-9 and abs(got[("W4A4", "psaq")]["closed"] - 0.25) < 1e-9
    assert abs(got[("W4A4", "psaq")]["noise_to_real_gap"] - 0.2) < 1e-9


def test_cached_sets_carry_the_method_revision(monkeypatch):
    from dfq_deploy.synth import METHODS

    key = grid.CellCache.source_key
    assert key("noise") == "noise" and key("real") == "real"  # not synthesis methods: no revision
    assert key("psaq") == "psaq"  # revision 0 keeps the names of sets cached before revisions existed
    assert key("spdfq") == "spdfq@r3" and key("spdfq:msr=false") == "spdfq:msr=false@r3"
    monkeypatch.setattr(METHODS.get("psaq"), "revision", 3)
    assert key("psaq:kde_points=8") == "psaq:kde_points=8@r3"  # a bumped default never reuses an old set


def test_preset_variants_change_config_fields_and_are_refused_when_unknown():
    import pytest

    from dfq_deploy.errors import DfqError

    cfg = grid.preset_config("W4A3:a_grid=asymmetric+a_calib=sequential")
    assert (cfg.a_bits, cfg.a_grid, cfg.a_calib, cfg.name) == (3, "asymmetric", "sequential",
                                                               "W4A3:a_grid=asymmetric+a_calib=sequential")
    assert not cfg.deployable
    assert grid.preset_config("W4A4-log2").attn_log2 and grid.preset_config("W4A3-paper").io_bits == 8
    with pytest.raises(DfqError, match="colour is not a QuantConfig field"):
        grid.preset_config("W4A3:colour=red")
    with pytest.raises(DfqError, match="name"):
        grid.preset_config("W4A3:name=x")


def test_float_formats_are_measured_or_labelled_simulated():
    assert grid.measured(grid.preset_config("FP8"))  # ONNX Runtime runs FP8 Q/DQ: measured on the graph
    assert not grid.measured(grid.preset_config("NVFP4"))  # no FP4 kernels in ORT: simulated
    assert not grid.measured(grid.preset_config("NVFP4-W4A16")) and grid.measured(grid.preset_config("W8A8"))
    rows = [{"preset": p, "source": s, "top1_mean": t, "top1_std": 0.0, "measured_on": m}
            for p, s, t, m in [("FP32", "-", 0.75, "onnxruntime (fp32 graph)"),
                               ("FP16", "-", 0.751, "onnxruntime (fp16 graph)"),
                               ("FP8", "noise", 0.752, "onnxruntime (fp16 graph)"),
                               ("NVFP4", "noise", 0.74, "simulated (pytorch)")]]
    md = grid.markdown({"summary": rows, "model": {"name": "m"}, "n_eval": 10, "data": "d", "seeds": 1,
                        "num_samples": 4, "correct": "diag"})
    assert "FP16 graph (ONNX Runtime): 75.10" in md and "| source | FP8 | NVFP4* |" in md
