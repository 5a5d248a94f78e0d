"""The range/correction diagnostic (experiments/calib_ranges.py) on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import timm
from safetensors.torch import save_file

from tests.conftest import make_image_folder

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "calib_ranges.py"


def test_ranges_and_swap(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    ckpt = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=1,
                                num_classes=10).state_dict(), str(ckpt))
    cmd = [sys.executable, str(SCRIPT), "--seeds", "1", "--sources", "noise", "--swap-sources", "noise",
           "--output", str(tmp_path), "--model", "deit_t",
           "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10", "--checkpoint", str(ckpt),
           "--data", str(data), "--calib-dir", str(data), "--limit", "8", "--num-samples", "4",
           "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "calib-ranges-deit_t.json").read_text())
    # one depth-1 DeiT at W4A3: qkv/proj/fc1/fc2 inputs and the four attention-matmul inputs
    assert set(res["log2_scale_vs_real"]) == {"qkv.input", "proj.input", "fc1.input", "fc2.input", "attn.q_quant",
                                              "attn.k_quant", "attn.p_quant", "attn.v_quant"}
    assert any(abs(v["noise"]) > 0.01 for v in res["log2_scale_vs_real"].values())  # noise is not the real set
    assert [(r["ranges"], r["correction"]) for r in res["swap"]] == [
        ("real", "none"), ("real", "real"), ("real", "noise"), ("noise", "none"), ("noise", "real"), ("noise", "noise")]
    assert all(0.0 <= r["top1"] <= 1.0 for r in res["swap"])
    assert json.loads((tmp_path / "calib-ranges-deit_t.json").read_text())["swap"] == res["swap"]
    assert "| qkv.input |" in (tmp_path / "calib-ranges-deit_t.md").read_text()
