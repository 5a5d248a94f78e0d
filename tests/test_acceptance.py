"""The GPU acceptance run: its plan, its one-line refusal without TensorRT/GPU, its summary on a recorded run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfq_deploy.acceptance import (
    EXPORTS,
    TESTS_DIR,
    acceptance_plan,
    compare_accuracy,
    failures,
    passed,
    run_gpu_tests,
    summary_markdown,
    write_summary,
)
from dfq_deploy.cli import main
from tests.trt.graphs import requires_gpu


# A run as run_acceptance returns it; the numbers are illustrative inputs for the summary writer, not measurements.
def _timed(export: str, p50: float) -> dict:
    return {"export": export, "name": "model.engine", "batches": [
        {"batch": b, "latency": {"p50_ms": p50 * b, "throughput_ips": 1000 / p50},
         "energy": {"available": True, "joules_per_image": 0.0123}} for b in (1, 8, 32)]}


RECORDED = {
    "tensorrt": "10.3.0", "gpu": {"name": "Orin (nvgpu)"}, "data": "dev", "limit": 500,
    "exports": {
        "fp16": {"onnx": "o/fp16/model.onnx", "engine": "o/fp16/model.engine", "dtype": "fp16", "parity_passed": True,
                 "accuracy": compare_accuracy(0.7810, 0.7800)},
        "w8a8": {"onnx": "o/w8a8/model.onnx", "engine": "o/w8a8/model.engine", "dtype": "fp16", "parity_passed": True,
                 "accuracy": compare_accuracy(0.7776, 0.7740),
                 "polygraphy": "polygraphy run o/w8a8/model.onnx --trt --onnxrt --strongly-typed"},
        "w4a16": {"onnx": "o/w4a16/model.onnx", "engine": "o/w4a16/model.engine", "dtype": "fp16",
                  "parity_passed": True, "accuracy": compare_accuracy(0.7790, 0.7770)},
    },
    "gpu_tests": {"ran": True, "passed": True, "summary": "9 passed in 80.1s",
                  "counts": {"tests": 9, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []}},
    "latency": [_timed("fp16", 0.91), _timed("w8a8", 0.71), _timed("w4a16", 0.81)],
    "skipped_by_request": [],
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
    assert saved["passed"] is True and saved["failures"] == []
    assert saved["exports"]["w8a8"]["accuracy"]["delta_points"] == pytest.approx(-0.36)
    md = paths[1].read_text()
    assert "**passed**" in md and "| w8a8 | fp16 | 77.76 | 77.40 | -0.36 | yes | passed |" in md
    assert "| fp16 | 1 | 0.910 | 1098.9 | 0.0123 |" in md
    assert "9 passed in 80.1s" in md
    assert "- w8a8: `polygraphy run o/w8a8/model.onnx --trt --onnxrt --strongly-typed`" in md


def test_the_polygraphy_line_comes_from_the_build_plan(tmp_path):
    import onnx

    from dfq_deploy.trt.commands import nvidia_commands
    from dfq_deploy.trt.planner import plan_build
    from tests.trt.graphs import vit_graph

    onnx_path = tmp_path / "model.onnx"
    onnx.save(vit_graph("W8A8", "fp16"), onnx_path)
    line = nvidia_commands(plan_build(onnx_path, "int8", batch=(1, 8, 32)))["polygraphy"]
    assert line.startswith("polygraphy run") and str(onnx_path) in line and "--trt" in line and "--onnxrt" in line


def _broken(kind: str) -> dict:
    run = json.loads(json.dumps(RECORDED))
    if kind == "accuracy":
        run["exports"]["w8a8"]["accuracy"] = compare_accuracy(0.7776, 0.70)
    elif kind == "parity":
        run["exports"]["fp16"]["parity_passed"] = False
    elif kind == "gpu_tests":
        run["gpu_tests"]["passed"] = False
    elif kind == "export_error":  # an export, build or evaluation that raised; the others still report
        run["exports"]["w4a16"] = {"error": "TensorRT failed to build the engine", "parity_passed": False}
    elif kind == "export_missing":
        del run["exports"]["w4a16"]
    elif kind == "gpu_tests_not_found":
        run["gpu_tests"] = {"ran": False, "reason": "GPU tests not found at /site-packages/tests/trt"}
    elif kind == "gpu_tests_skipped":  # on the GPU machine a skipped GPU test is a check that did not run
        run["gpu_tests"] = {"ran": True, "passed": False, "summary": "9 skipped", "skip_reasons": ["no GPU"],
                            "counts": {"tests": 9, "failures": 0, "errors": 0, "skipped": 9}}
    elif kind == "latency_skipped":
        run["latency"][0]["batches"][2] = {"batch": 32, "skipped": "outside the engine's profile"}
    elif kind == "latency_missing":
        run["latency"] = run["latency"][:2]
    elif kind == "energy_missing":
        run["latency"][1]["batches"][0]["energy"] = {"available": False, "reason": "no power sensor found"}
    return run


@pytest.mark.parametrize("broken, why", [
    ("accuracy", "export w8a8: engine top-1 not within"), ("parity", "export fp16: parity failed"),
    ("gpu_tests", "GPU tests failed"), ("export_error", "export w4a16: TensorRT failed to build the engine"),
    ("export_missing", "export w4a16: did not run"), ("gpu_tests_not_found", "GPU tests did not run: GPU tests not"),
    ("gpu_tests_skipped", "GPU tests failed: 9 skipped"),
    ("latency_skipped", "latency fp16 batch 32: outside the engine's profile"),
    ("latency_missing", "latency w4a16 batch 1: not measured"),
    ("energy_missing", "energy w8a8 batch 1: no power sensor found"),
])
def test_a_failed_or_missing_step_fails_the_run(broken, why):
    run = _broken(broken)
    md = summary_markdown(run)
    assert not passed(run) and "**FAILED**" in md
    assert [f for f in failures(run) if f.startswith(why)], failures(run)
    assert f"  - {why}" in md  # the summary says why
    if broken == "export_error":
        assert "| w4a16 | | | | | NO | failed: TensorRT failed to build the engine |" in md


@pytest.mark.parametrize("step, broken", [("gpu-tests", "gpu_tests_not_found"), ("energy", "energy_missing")])
def test_only_the_user_can_leave_a_step_out(step, broken):
    run = _broken(broken)
    run["skipped_by_request"] = [step]
    assert passed(run), failures(run)
    assert f"left out by request: {step}" in summary_markdown(run)


def test_the_gpu_tests_are_found_in_the_source_checkout():
    import dfq_deploy

    assert Path(dfq_deploy.__file__).resolve().parents[1] / "tests" / "trt" == TESTS_DIR
    assert TESTS_DIR.is_dir() and any(TESTS_DIR.glob("test_*.py"))


GPU_TEST = """import pytest

@pytest.mark.gpu
def test_on_the_gpu():
    {body}
"""


@pytest.mark.parametrize("body, ran, ok", [("assert 1 + 1 == 2", True, True),
                                           ("pytest.skip('no GPU here')", False, False),
                                           ("assert False", True, False), (None, False, False)])
def test_run_gpu_tests_counts_what_really_ran(tmp_path, body, ran, ok):
    tests = tmp_path / "gpu"
    tests.mkdir()
    (tests / "test_g.py").write_text(GPU_TEST.format(body=body) if body else "def test_cpu():\n    pass\n")
    result = run_gpu_tests(tests, tmp_path)
    assert result["ran"] is ran and passed({**RECORDED, "gpu_tests": result}) is ok, result
    if body and "skip" in body:
        assert result["skip_reasons"] and "no GPU here" in result["skip_reasons"][0]
    assert run_gpu_tests(tmp_path / "missing", tmp_path)["ran"] is False


def test_dry_run_says_when_the_gpu_tests_are_missing_or_left_out(tmp_path, capsys):
    assert main(["acceptance", str(tmp_path / "a"), "--dry-run", "--data", "dev", "--tests", str(tmp_path / "x")]) == 0
    assert "gpu tests: NOT FOUND" in capsys.readouterr().out
    assert main(["acceptance", str(tmp_path / "a"), "--dry-run", "--data", "dev", "--skip-gpu-tests",
                 "--skip-energy"]) == 0
    out = capsys.readouterr().out
    assert "gpu tests: left out (--skip-gpu-tests)" in out and "energy left out" in out


@pytest.mark.gpu
@requires_gpu
def test_acceptance_run_on_the_gpu(tmp_path):
    from dfq_deploy.acceptance import run_acceptance
    from dfq_deploy.data import default_cifar10

    result = run_acceptance(tmp_path, default_cifar10("dev"), limit=200, progress=False)
    assert set(result["exports"]) == {n for n, _, _ in EXPORTS}
    assert passed(result), failures(result)
    assert (tmp_path / "acceptance.md").is_file()
