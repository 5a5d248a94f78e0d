"""The GPU acceptance run: its plan, its one-line refusal without TensorRT/GPU, its summary on a recorded run."""

from __future__ import annotations

import json

import pytest

from dfq_deploy.acceptance import (
    EXPORTS,
    acceptance_plan,
    compare_accuracy,
    passed,
    summary_markdown,
    write_summary,
)
from dfq_deploy.cli import main
from tests.trt.graphs import requires_gpu

# A run as run_acceptance returns it; the numbers are illustrative inputs for the summary writer, not measurements.
RECORDED = {
    "tensorrt": "10.3.0", "gpu": {"name": "Orin (nvgpu)"}, "data": "dev", "limit": 500,
    "exports": {
        "fp16": {"onnx": "o/fp16/model.onnx", "engine": "o/fp16/model.engine", "dtype": "fp16", "parity_passed": True,
                 "accuracy": compare_accuracy(0.7810, 0.7800)},
        "w8a8": {"onnx": "o/w8a8/model.onnx", "engine": "o/w8a8/model.engine", "dtype": "fp16", "parity_passed": True,
                 "accuracy": compare_accuracy(0.7776, 0.7740)},
    },
    "gpu_tests": {"ran": True, "passed": True, "summary": "9 passed in 80.1s"},
    "latency": [{"name": "fp16", "batches": [{"batch": 1, "latency": {"p50_ms": 0.91, "throughput_ips": 1090.2},
                                              "energy": {"joules_per_image": 0.0123}},
                                             {"batch": 32, "skipped": "outside the engine's profile"}]}],
}


def test_plan_lists_every_step_in_order(tmp_path):
    names = [s.name for s in acceptance_plan(tmp_path, "dev", limit=500)]
    exports = [f"export {n}" for n, _, _ in EXPORTS]
    assert names[0] == "check" and names[1:4] == exports and names[-3:] == ["gpu tests", "latency", "summary"]
    assert [n for n in names if n.startswith(("build", "accuracy"))] == [
        f"{k} {n}" for n, _, _ in EXPORTS for k in ("build", "accuracy")]


def test_without_tensorrt_or_gpu_it_stops_at_once_with_one_line(tmp_path, capsys):
    code = main(["acceptance", str(tmp_path / "acc")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot start" in err and ("TensorRT is not installed" in err or "no usable NVIDIA GPU" in err)
    assert not (tmp_path / "acc").exists()  # nothing exported, nothing written


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert main(["acceptance", str(tmp_path / "acc"), "--dry-run", "--limit", "100", "--data", "dev"]) == 0
    out = capsys.readouterr().out
    assert "export w4a16: dfq-deploy export --bits 4" in out and "build w8a8: --precision int8" in out


def test_compare_accuracy_tolerance():
    check = compare_accuracy(0.78, 0.775)
    assert check["passed"] and check["delta_points"] == pytest.approx(-0.5)
    assert not compare_accuracy(0.78, 0.765)["passed"]


def test_summary_of_a_recorded_run(tmp_path):
    paths = write_summary(RECORDED, tmp_path)
    saved = json.loads(paths[0].read_text())
    assert saved["passed"] is True and saved["exports"]["w8a8"]["accuracy"]["delta_points"] == pytest.approx(-0.36)
    md = paths[1].read_text()
    assert "**passed**" in md and "| w8a8 | fp16 | 77.76 | 77.40 | -0.36 | yes | passed |" in md
    assert "| fp16 | 1 | 0.910 | 1090.2 | 0.0123 |" in md and "skipped: outside the engine's profile" in md
    assert "9 passed in 80.1s" in md


@pytest.mark.parametrize("broken", ["accuracy", "parity", "gpu_tests", "export_error"])
def test_any_failed_check_fails_the_run(broken):
    run = json.loads(json.dumps(RECORDED))
    if broken == "accuracy":
        run["exports"]["w8a8"]["accuracy"] = compare_accuracy(0.7776, 0.70)
    elif broken == "parity":
        run["exports"]["fp16"]["parity_passed"] = False
    elif broken == "gpu_tests":
        run["gpu_tests"]["passed"] = False
    else:  # an export, build or evaluation that raised is recorded, and the other exports still report
        run["exports"]["w4a16"] = {"error": "TensorRT failed to build the engine", "parity_passed": False}
    md = summary_markdown(run)
    assert not passed(run) and "**FAILED**" in md and "| w8a8 | fp16 | 77.76 |" in md
    if broken == "export_error":
        assert "| w4a16 | | | | | NO | failed: TensorRT failed to build the engine |" in md


@pytest.mark.gpu
@requires_gpu
def test_acceptance_run_on_the_gpu(tmp_path):
    from dfq_deploy.acceptance import run_acceptance
    from dfq_deploy.data import default_cifar10

    result = run_acceptance(tmp_path, default_cifar10("dev"), limit=200, progress=False)
    assert set(result["exports"]) == {n for n, _, _ in EXPORTS}
    assert all(e["accuracy"]["passed"] for e in result["exports"].values()), result["exports"]
    assert (tmp_path / "acceptance.md").is_file()
