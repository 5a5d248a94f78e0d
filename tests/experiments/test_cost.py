"""The cost benchmark (experiments/cost.py), run as a user runs it, on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "cost.py"
TINY = ["--model", "deit_t", "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10", "--random-weights"]


def test_cost_on_a_tiny_model(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *TINY, "--num-samples", "2", "--repeats", "1", "--skip-memory", "--iters",
           "5", "--warmup", "1", "--reconstruct-iters", "2", "--threads", "1", "--note", "test", "--output",
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "cost-deit_t.json").read_text())
    assert saved["command"].startswith("python experiments/cost.py --model deit_t")
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
    assert "psaq" in proc.stdout  # the table is printed


def test_memory_is_measured_in_fresh_processes(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *TINY, "--methods", "spdfq-msr-on", "--num-samples", "2", "--repeats", "1",
           "--iters", "3", "--warmup", "0", "--reconstruct-iters", "1", "--threads", "1", "--memory-model", "deit_t",
           "--memory-model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10", "--memory-num-samples", "2",
           "--memory-iters", "2", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "cost-deit_t.json").read_text())["memory"]
    assert set(result["variants"]) == {"baseline", "spdfq-msr-on"}
    for out in result["variants"].values():
        assert "error" not in out, out
        assert out["peak_rss_mb"] >= out["rss_after_model_mb"] > 0 and out["input_size"] == [3, 32, 32]
