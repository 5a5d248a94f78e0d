"""The mixed-precision benchmark and the estimator validation on their --smoke paths with tiny models."""

from __future__ import annotations

import json

import pytest

from dfq_deploy.bench import estimator, mixed
from tests.conftest import make_image_folder


@pytest.mark.slow  # about a minute: a search and seven exports
def test_smoke_mixed_benchmark_on_a_tiny_swin(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    argv = ["--smoke", "--tiny", "swin", "--budgets", "bits:3", "--data", str(data), "--calib-dir", str(data),
            "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")]
    res = mixed.main(argv)
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"auto bits:3", "W8A8", "W4A16", "W3A16", "W2A16", "ends W4A16 / W2A16",
                         "ends W4A16 / W3A16"}
    assert res["kind"] == "agreement"  # random weights: scored against the float graph, not the labels
    assert rows["auto bits:3"]["effective_bits"] <= 3 + 1e-9 and rows["W2A16"]["effective_bits"] == 2
    assert rows["W8A8"]["weight_mb"] > rows["W4A16"]["weight_mb"] == pytest.approx(rows["W2A16"]["weight_mb"])
    assert all(c["measured_on"].startswith("onnxruntime") for c in res["cells"])  # every cell is the artifact
    stem = tmp_path / "res" / "mixed-swin_t-tiny-smoke"
    assert json.loads(stem.with_suffix(".json").read_text())["rows"] == res["rows"]
    assert "| auto bits:3 | auto |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    again = mixed.main(argv)  # every cell was cached as it finished
    assert [r["top1_mean"] for r in again["rows"]] == [r["top1_mean"] for r in res["rows"]]


def test_smoke_estimator_validation(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    v = estimator.main(["--smoke", "--model", "deit_t", "--random-weights",
                        "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10",
                        "--data", str(data), "--calib-dir", str(data), "--presets", "W4A16,W4A4",
                        "--output", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    assert v["n_cells"] == 2 and {c["preset"]: c["simulated"] for c in v["cells"]} == {"W4A16": False, "W4A4": True}
    saved = json.loads((tmp_path / "res" / "estimator-deit_t.json").read_text())
    assert saved["cells"] == v["cells"] and saved["grid"]["n_eval"] == 8
    for c in v["cells"]:  # a measured drop is a multiple of 1/8 of the 8 images, in points
        assert (c["measured"] / 12.5) == pytest.approx(round(c["measured"] / 12.5))
        assert c["interval"][0] <= c["predicted"] <= c["interval"][1]
    md = (tmp_path / "res" / "estimator-deit_t.md").read_text()
    assert "Spearman" in md and "| W4A4* | noise |" in md
