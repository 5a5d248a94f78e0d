"""The GPU check without TensorRT (``acceptance --no-tensorrt``): its plan, its argument checks and one-line refusal
without a GPU, the CPU/CUDA comparison on real syntheses, the selection of the CUDA tests, the torchrun launch on
the CPU, and its verdict and summary on a recorded result. The whole check runs where a GPU is (``-m gpu``)."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
import torch

from dfq_deploy.acceptance import run_gpu_tests
from dfq_deploy.cli import main
from dfq_deploy.errors import DfqError
from dfq_deploy.gpucheck import (
    CUDA_TEST_FILES,
    IMAGES_ATOL,
    LOSS_RTOL,
    SYNTH_IMAGES,
    TESTS_ROOT,
    TORCHRUN_DIR,
    compare_synthesis,
    failures,
    gpu_test_paths,
    gpucheck_plan,
    passed,
    run_gpucheck,
    summary_markdown,
    torchrun_check,
    torchrun_command,
    write_summary,
)

HAS_CUDA = torch.cuda.is_available()
no_gpu_here = pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is available here")

# A run as run_gpucheck returns it; the numbers are illustrative inputs for the verdict and the summary writer,
# not measurements (no GPU has run this check yet).
RECORDED = {
    "check": "gpu (no TensorRT)", "torch": "2.8.0+cu128", "cuda": "12.8", "nccl": "2.27.3", "gpu_count": 1,
    "gpu": {"device": "cuda:0", "name": "NVIDIA L4", "memory_gb": 22.0, "compute_capability": "8.9"},
    "skipped_by_request": [], "started": "2025-01-01 00:00:00", "seconds": 150.0,
    "synthesis": {"method": "dfqvit", "model": "deit_tiny_cifar10", "images": 8, "iterations": 5, "seed": 0,
                  "precision": "fp32", "cpu": {"s_per_it": 0.12, "seconds": 0.6, "threads": 16},
                  "cuda": {"s_per_it": 0.02, "seconds": 0.1, "device": {"device": "cuda:0"},
                           "peak_memory_bytes": 80 * 2**20},
                  "speedup": 6.0,
                  "agreement": {"targets_equal": True, "images_max_abs": 1e-3, "images_atol": IMAGES_ATOL,
                                "loss_max_rel": 1e-4, "loss_rtol": LOSS_RTOL, "iterations_compared": 5,
                                "passed": True}},
    "gpu_tests": {"ran": True, "passed": True, "summary": "8 passed in 60.0s",
                  "counts": {"tests": 8, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []}},
    "energy": {"available": True, "joules_per_image": 2.5e-4, "avg_watts": 70.0, "window_s": 5.0, "batch": 256,
               "images": 1_400_000, "images_per_s": 280_000.0, "method": "total-energy counter", "warnings": []},
    "torchrun": {"command": "torchrun --standalone --nproc-per-node 1 -m dfq_deploy synth ...", "nproc": 1,
                 "expected_images": 8, "output": "o/torchrun-synth", "returncode": 0, "seconds": 20.0,
                 "stderr_tail": [], "images": 8, "finite": True, "processes": 1, "backend": "nccl",
                 "s_per_it": 0.03, "max_abs_vs_in_process": 0.0},
}


def test_plan_lists_every_step_in_order(tmp_path: Path) -> None:
    steps = gpucheck_plan(tmp_path / "out")
    assert [s.name for s in steps] == ["check", "synthesis", "gpu tests", "energy", "torchrun", "summary"]
    detail = {s.name: s.detail for s in steps}
    assert "fp32" in detail["synthesis"] and f"within {IMAGES_ATOL:g}" in detail["synthesis"]
    assert detail["gpu tests"].startswith("pytest -o addopts= -m gpu ")
    assert all(str(p) in detail["gpu tests"] for p in gpu_test_paths())
    assert "NVML" in detail["energy"] and "nvidia-ml-py" in detail["check"]
    assert detail["torchrun"].startswith("torchrun --standalone --nproc-per-node N -m dfq_deploy synth")
    assert str(tmp_path / "out" / "gpucheck.json") in detail["summary"]
    left_out = {s.name: s.detail for s in gpucheck_plan(tmp_path, skip=["gpu-tests", "energy"])}
    assert left_out["gpu tests"] == "left out (--skip-gpu-tests)" and left_out["energy"] == "left out (--skip-energy)"
    assert "nvidia-ml-py" not in left_out["check"]
    missing = {s.name: s.detail for s in gpucheck_plan(tmp_path, tests_root=tmp_path / "nowhere")}
    assert missing["gpu tests"].startswith("NOT FOUND: ")


def test_the_torchrun_launch_is_this_python_on_the_bundled_model(tmp_path: Path) -> None:
    import sys

    cmd = torchrun_command(tmp_path / "t", 2)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert cmd[6:9] == ["-m", "dfq_deploy", "synth"] and cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[cmd.index("--num-samples") + 1] == str(SYNTH_IMAGES) and cmd[cmd.index("--synth-dtype") + 1] == "fp32"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gc"
    assert main(["acceptance", str(out), "--no-tensorrt", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["check", "synthesis", "gpu tests", "energy", "torchrun",
                                                     "summary"]
    assert not out.exists()


@no_gpu_here
@pytest.mark.parametrize("extra, energy", [([], True), (["--skip-energy"], False)])
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      extra: list[str], energy: bool) -> None:
    import importlib.util

    out = tmp_path / "gc"
    t0 = time.perf_counter()
    code = main(["acceptance", str(out), "--no-tensorrt", *extra])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("dfq-deploy: error: the GPU check cannot start: no CUDA GPU visible to PyTorch "
                          "(torch.cuda.is_available() is False")
    has_pynvml = importlib.util.find_spec("pynvml") is not None
    assert ("nvidia-ml-py is not installed" in err) == (energy and not has_pynvml)
    assert not out.exists()  # nothing written
    assert elapsed < 30, elapsed  # no model, no synthesis before the refusal
    with pytest.raises(DfqError, match="no CUDA GPU visible to PyTorch"):
        run_gpucheck(out)  # the Python API refuses alike


@pytest.mark.parametrize("argv, message", [
    (["--limit", "5"], "--limit belong to the TensorRT acceptance run"),
    (["--data", "dev", "--limit", "5"], "--data and --limit belong to the TensorRT acceptance run"),
])
def test_tensorrt_only_arguments_are_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    assert main(["acceptance", str(tmp_path / "gc"), "--no-tensorrt", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "GPU check cannot start" not in err


def test_an_output_that_is_a_file_or_holds_a_torchrun_run_is_refused(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["acceptance", str(f), "--no-tensorrt", "--dry-run"]) == 2
    assert "is a file" in capsys.readouterr().err
    held = tmp_path / "gc" / TORCHRUN_DIR
    held.mkdir(parents=True)
    (held / "config.json").write_text("{}")
    assert main(["acceptance", str(tmp_path / "gc"), "--no-tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier torchrun run" in err


def test_compare_synthesis_on_real_runs_of_the_bundled_model() -> None:
    from dfq_deploy.models import ModelSpec, create_model, data_config
    from dfq_deploy.synth import synthesize

    model = create_model(ModelSpec())
    opts = {"num_samples": 2, "iterations": 2, "seed": 0, "precision": "fp32"}
    res = synthesize(model, data_config(model), "dfqvit", opts, progress=False, device="cpu")
    run = {"images": res.images, "targets": res.targets, "losses": [h["total"] for h in res.history]}
    same = compare_synthesis(run, copy.deepcopy(run))
    assert same["passed"] and same["images_max_abs"] == 0 and same["loss_max_rel"] == 0 and same["targets_equal"]
    near = compare_synthesis(run, {**run, "images": run["images"] + 0.9 * IMAGES_ATOL})
    assert near["passed"] and near["images_max_abs"] == pytest.approx(0.9 * IMAGES_ATOL, rel=1e-4)
    far = compare_synthesis(run, {**run, "images": run["images"] + 1.1 * IMAGES_ATOL})
    assert not far["passed"] and far["pixels_over_atol"] == far["pixels"] == run["images"].numel()
    one = run["images"].clone()
    one[0, 0, 0, 0] += 0.3  # one pixel a sign flip apart (Adam's first step is lr * sign(gradient))
    flipped = compare_synthesis(run, {**run, "images": one})
    assert not flipped["passed"] and flipped["pixels_over_atol"] == 1
    assert flipped["images_mean_abs"] == pytest.approx(0.3 / one.numel(), rel=1e-3)
    md = summary_markdown({**RECORDED, "synthesis": {**RECORDED["synthesis"], "agreement": flipped}})
    assert f"1 of {one.numel()} pixels beyond the tolerance" in md and "verdict: **FAILED**" in md
    lossy = compare_synthesis(run, {**run, "losses": [v * (1 + 1.5 * LOSS_RTOL) for v in run["losses"]]})
    assert not lossy["passed"] and lossy["loss_max_rel"] == pytest.approx(1.5 * LOSS_RTOL)
    other = compare_synthesis(run, {**run, "targets": run["targets"].flip(0)})
    assert not other["passed"] and not other["targets_equal"]
    short = compare_synthesis(run, {**run, "losses": run["losses"][:1], "images": run["images"][:1]})
    assert not short["passed"] and short["loss_max_rel"] is None and short["images_max_abs"] is None
    result = {**RECORDED, "synthesis": {**RECORDED["synthesis"], "agreement": short}}
    assert any("other shapes" in f for f in failures(result)) and any("other lengths" in f for f in failures(result))


def test_the_cuda_tests_need_no_tensorrt_and_none_is_forgotten() -> None:
    for path in gpu_test_paths():
        text = path.read_text()
        assert path.is_file() and "pytest.mark.gpu" in text, path
        assert not re.search(r"^\s*(import tensorrt|from dfq_deploy\.trt|from tests\.trt)", text, re.M), path
    # every other test file with GPU tests needs TensorRT (or is this check itself)
    needs_tensorrt = {"test_acceptance.py"}
    for path in TESTS_ROOT.rglob("test_*.py"):
        rel = path.relative_to(TESTS_ROOT).as_posix()
        if "pytest.mark.gpu" not in path.read_text() or rel.startswith("trt/"):
            continue
        assert rel in CUDA_TEST_FILES or rel in needs_tensorrt or rel == "test_gpucheck.py", (
            f"{rel} has GPU tests: add it to gpucheck.CUDA_TEST_FILES if they need no TensorRT")


@no_gpu_here
def test_the_cuda_tests_are_collected_and_all_skip_here(tmp_path: Path) -> None:
    """The selection collects real tests; here every one skips, which is a failure of the check, not a pass."""
    res = run_gpu_tests(gpu_test_paths(), tmp_path, report_name="t.xml")
    assert res["ran"] is False and res["counts"]["tests"] >= 6
    assert res["counts"]["skipped"] == res["counts"]["tests"] and res["counts"]["errors"] == 0
    assert "all" in res["reason"] and "CUDA" in res["reason"]
    why = failures({**RECORDED, "gpu_tests": res})
    assert why == [f"CUDA tests did not run: {res['reason']}"]
    assert run_gpu_tests([*gpu_test_paths(), tmp_path / "gone.py"], tmp_path)["ran"] is False


def test_the_torchrun_launch_on_the_cpu_writes_its_images(tmp_path: Path) -> None:
    """The same launch as on the GPU, with --device cpu: one process joins torchrun's group (gloo on the CPU)."""
    res = torchrun_check(tmp_path, 1, device="cpu", timeout_s=300)
    assert res["returncode"] == 0, res.get("stderr_tail")
    assert res["images"] == SYNTH_IMAGES and res["finite"] and res["processes"] == 1 and res["backend"] == "gloo"
    assert (tmp_path / TORCHRUN_DIR / "images.safetensors").is_file()
    assert failures({**RECORDED, "torchrun": res}) == ["torchrun: backend gloo, expected nccl on CUDA"]


def test_a_recorded_run_passes_and_its_summary_says_why(tmp_path: Path) -> None:
    assert failures(RECORDED) == [] and passed(RECORDED)
    md = summary_markdown(RECORDED)
    assert "verdict: **passed**" in md and "NVIDIA L4" in md and "6.0x the CPU's speed" in md
    assert "1 process(es), backend nccl" in md  # one GPU: one process, in an NCCL group
    written = write_summary(RECORDED, tmp_path)
    assert [p.name for p in written] == ["gpucheck.json", "gpucheck.md"]
    saved = json.loads((tmp_path / "gpucheck.json").read_text())
    assert saved["passed"] is True and saved["failures"] == []
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("step", ["synthesis", "gpu_tests", "energy", "torchrun"])
def test_a_step_that_did_not_run_fails_the_verdict(tmp_path: Path, step: str) -> None:
    result = {k: v for k, v in RECORDED.items() if k != step}
    why = failures(result)
    assert len(why) == 1 and "did not run" in why[0], why
    assert not passed(result)
    write_summary(result, tmp_path)
    assert "verdict: **FAILED**" in (tmp_path / "gpucheck.md").read_text()
    assert json.loads((tmp_path / "gpucheck.json").read_text())["failures"] == why


def test_only_a_step_left_out_by_request_may_be_missing() -> None:
    result = {k: v for k, v in RECORDED.items() if k not in ("gpu_tests", "energy")}
    result["skipped_by_request"] = ["energy", "gpu-tests"]
    assert passed(result)
    assert "left out by request: energy, gpu-tests" in summary_markdown(result)
    for step in ("synthesis", "torchrun"):  # these cannot be left out
        assert not passed({k: v for k, v in result.items() if k != step})


@pytest.mark.parametrize("change, expected", [
    ({"synthesis": {"error": "RuntimeError: CUDA error: out of memory"}}, "synthesis: RuntimeError: CUDA error"),
    ({"synthesis": {**RECORDED["synthesis"], "cuda": {"s_per_it": None}}}, "no time per iteration on cuda"),
    ({"synthesis": {**RECORDED["synthesis"], "agreement": {**RECORDED["synthesis"]["agreement"],
                                                           "images_max_abs": 0.2}}}, "images differ by 0.2"),
    ({"synthesis": {**RECORDED["synthesis"], "agreement": {**RECORDED["synthesis"]["agreement"],
                                                           "images_max_abs": float("nan")}}}, "images differ by nan"),
    ({"synthesis": {**RECORDED["synthesis"], "agreement": {**RECORDED["synthesis"]["agreement"],
                                                           "loss_max_rel": 0.05}}}, "losses differ by 5%"),
    ({"gpu_tests": {"ran": True, "passed": False, "summary": "1 failed, 7 passed"}}, "CUDA tests failed: 1 failed"),
    ({"gpu_tests": {"error": "OSError: [Errno 28] No space left on device"}}, "CUDA tests: OSError: [Errno 28]"),
    ({"energy": {"available": False, "reason": "pynvml is not installed"}}, "energy: pynvml is not installed"),
    ({"energy": {"error": "NVMLError: Unknown Error"}}, "energy: NVMLError"),
    ({"torchrun": {**RECORDED["torchrun"], "returncode": 1, "stderr_tail": ["dfq-deploy: error: boom"]}},
     "torchrun: exit code 1: dfq-deploy: error: boom"),
    ({"torchrun": {**RECORDED["torchrun"], "images": 4}}, "torchrun: wrote 4 images, expected 8"),
    ({"torchrun": {**RECORDED["torchrun"], "nproc": 2}}, "torchrun: 1 process(es) synthesised, 2 were started"),
    ({"torchrun": {**RECORDED["torchrun"], "nproc": 2, "processes": 2, "backend": "gloo"}},
     "backend gloo, expected nccl"),
    ({"torchrun": {"command": "torchrun ...", "error": "timed out after 300 s"}}, "torchrun: timed out"),
])
def test_each_failed_check_is_named(change: dict, expected: str) -> None:
    result = {**RECORDED, **change}
    why = failures(result)
    assert len(why) == 1 and expected in why[0], why
    assert "verdict: **FAILED**" in summary_markdown(result) and expected in summary_markdown(result)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_the_whole_check_on_a_gpu(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    result = run_gpucheck(tmp_path, progress=False)
    assert passed(result), failures(result)
    assert time.perf_counter() - t0 < 480
    assert (tmp_path / "gpucheck.md").is_file() and json.loads((tmp_path / "gpucheck.json").read_text())["passed"]
    assert result["synthesis"]["cuda"]["s_per_it"] > 0 and result["energy"]["joules_per_image"] > 0
