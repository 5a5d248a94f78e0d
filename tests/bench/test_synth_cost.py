"""Synthesis cost per device (dfq_deploy.bench.synth_cost) and its command, experiments/synth_devices.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfq_deploy.bench.synth_cost import TARGET_RATIO, device_row
from dfq_deploy.models import ModelSpec, create_model, data_config
from tests.conftest import TINY_KWARGS

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "synth_devices.py"
TINY = "img_size=32,patch_size=4,depth=2,num_classes=10"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_device_row_on_the_cpu(precision: str) -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True))
    row = device_row(model, data_config(model), "dfqvit", num_samples=4, iters=2, warmup=1, precision=precision)
    assert row["device"]["device"] == "cpu" and row["precision"] == precision
    assert len(row["baseline_times_s"]["before"]) == 3 and len(row["baseline_times_s"]["after"]) == 2
    assert len(row["method_times_s"]) == 3  # warm-up + timed + one more
    assert row["ratio"] == pytest.approx(row["method_s_per_it"] / row["baseline_s_per_it"])
    assert row["meets_target"] == (row["ratio"] <= TARGET_RATIO)
    assert row["options"] == {"global_frac": 0.0} and row["method_peak_bytes"] is None
    assert row["images_per_pass"] == 4


def test_synth_devices_command_writes_rows(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "deit_t", "--model-kwargs", TINY,
           "--precisions", "fp32", "--num-samples", "2", "--iters", "1", "--warmup", "0", "--threads", "1",
           "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "synth-devices-cpu.json").read_text())
    (row,) = saved["rows"]
    assert "error" not in row and row["alias"] == "deit_t" and row["peak_rss_bytes"] > 0
    assert "| deit_t |" in (tmp_path / "synth-devices-cpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_synth_devices_without_cuda_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available here" in lines[0]
