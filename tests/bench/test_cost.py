"""The cost benchmark (bench/cost.py) on a tiny random model, so the harness cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "cost.py"
TINY = ["--model", "deit_t", "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10", "--random-weights"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """main() sets torch's thread count (--threads 1): give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load():
    spec = importlib.util.spec_from_file_location("bench_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_cost_on_a_tiny_model(tmp_path):
    mod = _load()
    result = mod.main([*TINY, "--num-samples", "2", "--repeats", "1", "--skip-memory", "--iters", "5", "--warmup",
                       "1", "--reconstruct-iters", "2", "--threads", "1", "--note", "test",
                       "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "cost-deit_t.json").read_text())
    assert saved["command"].startswith("python bench/cost.py --model deit_t")
    assert saved["note"] == "test" and saved["threads"] == 1 and saved["memory"] is None
    synth = saved["synthesis"]
    assert set(synth) == {"psaq", "spdfq-msr-off", "spdfq-msr-on", "spdfq-msr-all", "dfqvit"}
    assert synth["spdfq-msr-off"]["options"] == {"msr": False}
    assert synth["spdfq-msr-all"]["options"] == {"msr": True, "crops_per_step": 0}
    for s in synth.values():
        assert s["s_per_it"] > 0 and s["baseline_s_per_it"] > 0 and s["ratio"] > 0
        assert s["images_x_iters_per_s"] > 0 and s["synthesis_s_at_default_iterations"] > 0
        assert all(r["ratio"] > 0 for r in s["raw"])
    assert set(synth["dfqvit"]["stage_s_per_it"]) == {"global", "detail"}
    runs = saved["corrections"]["runs"]
    assert {(r["preset"], r["correct"], r["reconstruct"]) for r in runs} >= {
        ("W4A16", "full", False), ("W8A8", "none", False), ("W8A8", "diag", True)}
    for r in runs:
        assert r["quantize_s"] > 0
        assert (r["fit_s"] > 0) == (r["correct"] != "none")
        assert set(r["fit_over_synthesis"]) == set(synth)
        if r["reconstruct"]:
            assert r["reconstruct_s"] > 0 and r["reconstruct_iters"] == 2
    assert result["synthesis"]["psaq"]["ratio"] == synth["psaq"]["ratio"]


def test_memory_is_measured_in_fresh_processes():
    mod = _load()
    args = mod.parse_args(["--memory-model", "deit_t", "--memory-model-kwargs",
                           "img_size=32,patch_size=4,depth=1,num_classes=10", "--memory-num-samples", "2",
                           "--memory-iters", "2", "--threads", "1"])
    result = mod.measure_memory([v for v in mod.variants() if v.key == "spdfq-msr-on"], args)
    assert set(result["variants"]) == {"baseline", "spdfq-msr-on"}
    for out in result["variants"].values():
        assert "error" not in out, out
        assert out["peak_rss_mb"] >= out["rss_after_model_mb"] > 0 and out["input_size"] == [3, 32, 32]
