"""The GPU check for a machine with an NVIDIA GPU and PyTorch CUDA but no TensorRT (``dfq-deploy acceptance OUTDIR
--no-tensorrt``): a cloud GPU or a CI runner, in a few minutes.

Top to bottom:

1. check that PyTorch sees a CUDA GPU (and that ``pynvml`` is there for the energy step), and refuse at once, in
   one line naming what is missing, before any work;
2. **synthesis on the CPU and on CUDA** for the same seed (the bundled model, ``dfqvit``, :data:`SYNTH_IMAGES`
   images x :data:`SYNTH_ITERS` iterations, fp32 on both, after one warm-up iteration on each): time per
   iteration on each device, and the agreement the CUDA tests document (``tests/synth/test_synth_device.py``):
   the same targets, images within :data:`IMAGES_ATOL`, every iteration's loss within :data:`LOSS_RTOL`;
3. **the CUDA tests that need no TensorRT** (:data:`CUDA_TEST_FILES` of the source checkout, ``pytest -m gpu``
   with the project's ``addopts`` cleared, counted from their JUnit XML by
   :func:`dfq_deploy.acceptance.run_gpu_tests`): a skipped, missing or uncollected test is a failure;
4. **energy per image** of a PyTorch forward loop of the bundled model on the GPU (batch :data:`ENERGY_BATCH`,
   :data:`ENERGY_SECONDS` s), from NVML (:class:`dfq_deploy.bench.nvml.NVMLSampler`, the GPU found by its PCI
   bus id);
5. **a torchrun launch** of ``dfq-deploy synth`` on the GPU (one process per GPU, at most
   :data:`TORCHRUN_MAX_PROCS`), checked to finish and write its images in an NCCL group (the project picks NCCL
   on CUDA and joins torchrun's group for any number of processes, one GPU included);
6. write ``gpucheck.json`` and ``gpucheck.md`` (atomically), and return non-zero when a check failed.

As in :func:`dfq_deploy.acceptance.failures`, a check that was asked for and did not run is a failure; only the
user can leave a step out (``--skip-gpu-tests``, ``--skip-energy``), and the summary says so.

Only step 1, the plan, the argument checks, the synthesis comparison and the verdict and summary of a recorded
result run without a GPU; they are what the tests here cover.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from dfq_deploy.acceptance import SKIPPABLE, Step, check_skip, run_gpu_tests
from dfq_deploy.config import BUNDLED_MODEL
from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_json, atomic_write_text, removed_if_left_empty

logger = logging.getLogger(__name__)

#: The synthesis compared on the CPU and on CUDA, and run under torchrun: method, images, iterations, seed.
SYNTH_METHOD = "dfqvit"
SYNTH_IMAGES = 8
SYNTH_ITERS = 5
SYNTH_SEED = 0
#: CPU vs CUDA tolerances, those of ``tests/synth/test_synth_device.py`` (``DEVICE_ATOL`` and its loss check):
#: images within 5e-2 (1% of the normalised range), every iteration's total loss within 1% of the CPU's.
IMAGES_ATOL = 5e-2
LOSS_RTOL = 1e-2
#: The source checkout's tests folder (``<repo>/dfq_deploy/gpucheck.py`` -> ``<repo>/tests``); an install without
#: the source tree has none: pass ``--tests DIR`` or ``--skip-gpu-tests``.
TESTS_ROOT = Path(__file__).resolve().parents[1] / "tests"
#: The GPU tests that need CUDA and no TensorRT, relative to the tests folder (``tests/trt`` and the TensorRT
#: acceptance test need TensorRT; ``tests/test_gpucheck.py`` runs this check itself).
CUDA_TEST_FILES = ("test_device.py", "synth/test_synth_device.py", "test_pipeline_device.py")
GPU_TESTS_TIMEOUT_S = 360
#: The energy step: a forward loop of this many images a batch, timed for this long after a warm-up.
ENERGY_BATCH = 256
ENERGY_SECONDS = 5.0
ENERGY_WARMUP = 10
#: torchrun starts one process per GPU, at most this many (2: enough to exercise the collectives).
TORCHRUN_MAX_PROCS = 2
TORCHRUN_DIR = "torchrun-synth"
TORCHRUN_TIMEOUT_S = 300
#: The whole check should take less than this on a GPU machine (recorded, not a verdict: a check's time is not
#: its result).
TARGET_SECONDS = 480
SUMMARY_FILES = ("gpucheck.json", "gpucheck.md")


def gpu_test_paths(tests_root: str | Path | None = None) -> list[Path]:
    """The CUDA test files (:data:`CUDA_TEST_FILES`) in ``tests_root`` (default :data:`TESTS_ROOT`)."""
    root = Path(tests_root) if tests_root is not None else TESTS_ROOT
    return [root / f for f in CUDA_TEST_FILES]


def torchrun_command(output: str | Path, nproc: int, device: str = "cuda") -> list[str]:
    """The torchrun launch of step 5 (``python -m torch.distributed.run`` is ``torchrun`` of this Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "dfq_deploy", "synth", "--model", BUNDLED_MODEL, "--method", SYNTH_METHOD,
            "--num-samples", str(SYNTH_IMAGES), "--iters", str(SYNTH_ITERS), "--seed", str(SYNTH_SEED),
            "--device", device, "--synth-dtype", "fp32", "--output", str(output), "-q"]


def gpucheck_plan(outdir: str | Path, tests_root: str | Path | None = None,
                  skip: Collection[str] = ()) -> list[Step]:
    """The steps :func:`run_gpucheck` takes, in order (no GPU needed)."""
    check_skip(skip)
    out = Path(outdir)
    steps = [Step("check", "a CUDA GPU visible to PyTorch" + ("" if "energy" in skip else ", nvidia-ml-py (pynvml)"))]
    steps.append(Step("synthesis", f"{SYNTH_METHOD} on the bundled {BUNDLED_MODEL}, {SYNTH_IMAGES} images x "
                                   f"{SYNTH_ITERS} iterations, seed {SYNTH_SEED}, fp32, on the CPU and on cuda:0 "
                                   "(one warm-up iteration each): s/iteration on each; the same targets, images "
                                   f"within {IMAGES_ATOL:g}, losses within {100 * LOSS_RTOL:g}%"))
    if "gpu-tests" in skip:
        steps.append(Step("gpu tests", "left out (--skip-gpu-tests)"))
    else:
        paths = gpu_test_paths(tests_root)
        missing = [str(p) for p in paths if not p.is_file()]
        steps.append(Step("gpu tests", f"NOT FOUND: {', '.join(missing)} (the run will fail; pass --tests DIR, the "
                                       "source checkout's tests folder, or --skip-gpu-tests)" if missing else
                          f"pytest -o addopts= -m gpu {' '.join(map(str, paths))} (none may skip)"))
    steps.append(Step("energy", "left out (--skip-energy)" if "energy" in skip else
                      f"NVML energy per image of a PyTorch forward loop of {BUNDLED_MODEL} on cuda:0 "
                      f"(batch {ENERGY_BATCH}, {ENERGY_SECONDS:g} s)"))
    cmd = torchrun_command(out / TORCHRUN_DIR, 1)
    shown = " ".join(["torchrun", *cmd[3:5], "N", *cmd[6:]])
    steps.append(Step("torchrun", f"{shown}; N = 1 per GPU, at most {TORCHRUN_MAX_PROCS}, on NCCL; it must finish "
                                  f"and write {SYNTH_IMAGES} images"))
    steps.append(Step("summary", ", ".join(str(out / f) for f in SUMMARY_FILES)))
    return steps


def check_arguments(outdir: str | Path, skip: Collection[str] = (), data: str | None = None,
                    limit: int | None = None) -> None:
    """Refuse, in one line, what the check cannot do with these arguments (before any GPU or model work).

    Raises:
        DfqError: ``--data``/``--limit`` (TensorRT run only), an unknown step to leave out, an output that is a
            file, or an output that already holds this check's torchrun run.
    """
    if data is not None or limit is not None:
        flags = " and ".join(f for f, v in (("--data", data), ("--limit", limit)) if v is not None)
        raise DfqError(f"{flags} belong to the TensorRT acceptance run; --no-tensorrt measures no accuracy: "
                       "drop them")
    check_skip(skip)
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise DfqError(f"{out} is a file: choose a folder for the GPU check")
    if (out / TORCHRUN_DIR).exists() and any((out / TORCHRUN_DIR).iterdir()):
        raise DfqError(f"{out / TORCHRUN_DIR} holds an earlier torchrun run: choose a new OUTDIR or remove it")


def cuda_problem() -> str | None:
    """None when PyTorch sees a CUDA GPU, else why not (one phrase)."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    else:
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver: check them "
               "with nvidia-smi")
    return f"no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False; {why})"


def check_environment(skip: Collection[str] = ()) -> None:
    """Raise one line naming what is missing: a CUDA GPU PyTorch can use, or pynvml for the energy step."""
    import importlib.util

    problems = []
    gpu = cuda_problem()
    if gpu is not None:
        problems.append(gpu)
    if "energy" not in skip and importlib.util.find_spec("pynvml") is None:
        problems.append("nvidia-ml-py is not installed for the energy step (pip install nvidia-ml-py, or "
                        "--skip-energy)")
    if problems:
        raise DfqError("the GPU check cannot start: " + "; ".join(problems))


def environment() -> dict[str, Any]:
    """torch, CUDA, NCCL and GPU of this machine, for the summary."""
    import torch

    from dfq_deploy.device import describe_device

    nccl = None
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            nccl = "available (version unknown)"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "gpu_count": torch.cuda.device_count(), "gpu": describe_device(torch.device("cuda", 0))}


# -- step 2: synthesis on the CPU and on CUDA ----------------------------------------------------------------
def compare_synthesis(cpu: dict[str, Any], gpu: dict[str, Any], images_atol: float = IMAGES_ATOL,
                      loss_rtol: float = LOSS_RTOL) -> dict[str, Any]:
    """Agreement of two syntheses of the same seed, as ``tests/synth/test_synth_device.py`` checks it.

    Args:
        cpu: ``images``, ``targets`` (tensors) and ``losses`` (every iteration's total) of the CPU run.
        gpu: the same of the CUDA run.
        images_atol: the images may differ by less than this, pixel by pixel.
        loss_rtol: every iteration's loss may differ by at most this fraction of the CPU's.

    Returns:
        ``targets_equal``, ``images_max_abs``, ``loss_max_rel`` (None where the runs cannot be compared: other
        shapes, another number of iterations; NaN where a value is not finite), the tolerances and ``passed``;
        and, to tell a few pixels from a drift, ``images_mean_abs`` and ``pixels_over_atol`` of ``pixels``.
        Adam's first step moves every pixel by the learning rate times the sign of its gradient, so a gradient
        near zero whose sign differs between the devices moves that pixel up to twice the learning rate apart
        (a CPU run with the weights perturbed by 1e-5 of their size: 4 of 24,576 pixels about 0.3 apart, the
        mean 1e-4, the losses within 3e-4); synthesis allows TF32 on CUDA
        (:func:`dfq_deploy.device.synthesis_numerics`).
    """
    import torch

    same_shape = tuple(cpu["images"].shape) == tuple(gpu["images"].shape)
    targets_equal = bool(same_shape and torch.equal(cpu["targets"], gpu["targets"]))
    diff = (cpu["images"] - gpu["images"]).abs() if same_shape else None
    images_max_abs = float(diff.max()) if diff is not None else None
    loss_max_rel = None  # None: not comparable (another shape, another number of iterations)
    if len(cpu["losses"]) == len(gpu["losses"]) and cpu["losses"]:
        loss_max_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu["losses"], gpu["losses"], strict=True))
    ok = (targets_equal and images_max_abs is not None and images_max_abs < images_atol
          and loss_max_rel is not None and loss_max_rel <= loss_rtol)
    return {"targets_equal": targets_equal, "images_max_abs": images_max_abs, "images_atol": images_atol,
            "images_mean_abs": float(diff.mean()) if diff is not None else None,
            "pixels_over_atol": int((diff >= images_atol).sum()) if diff is not None else None,
            "pixels": int(diff.numel()) if diff is not None else None,
            "loss_max_rel": loss_max_rel, "loss_rtol": loss_rtol, "iterations_compared": len(cpu["losses"]),
            "passed": bool(ok)}


def synthesis_check(model: Any, data_cfg: dict[str, Any], progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Step 2: the same synthesis on the CPU and on ``cuda:0``; returns the result and the CUDA images."""
    import torch

    from dfq_deploy.synth import synthesize

    opts = {"num_samples": SYNTH_IMAGES, "iterations": SYNTH_ITERS, "seed": SYNTH_SEED, "precision": "fp32"}
    runs: dict[str, Any] = {}
    for device in ("cpu", "cuda"):
        logger.info("gpucheck: synthesis on %s (1 warm-up iteration, then %d)", device, SYNTH_ITERS)
        synthesize(model, data_cfg, SYNTH_METHOD, {**opts, "iterations": 1}, progress=False, device=device)
        runs[device] = synthesize(model, data_cfg, SYNTH_METHOD, opts, progress=progress, device=device)
    cpu, gpu = runs["cpu"], runs["cuda"]

    def losses(res: Any) -> list[float]:
        return [float(h["total"]) for h in res.history]

    agreement = compare_synthesis({"images": cpu.images, "targets": cpu.targets, "losses": losses(cpu)},
                                  {"images": gpu.images, "targets": gpu.targets, "losses": losses(gpu)})
    cpu_s, gpu_s = cpu.seconds_per_iteration, gpu.seconds_per_iteration
    result = {"method": SYNTH_METHOD, "model": BUNDLED_MODEL, "images": SYNTH_IMAGES, "iterations": SYNTH_ITERS,
              "seed": SYNTH_SEED, "precision": "fp32",
              "cpu": {"s_per_it": cpu_s, "seconds": cpu.seconds, "device": cpu.device,
                      "threads": torch.get_num_threads()},
              "cuda": {"s_per_it": gpu_s, "seconds": gpu.seconds, "device": gpu.device,
                       "peak_memory_bytes": gpu.peak_memory_bytes},
              "speedup": cpu_s / gpu_s if cpu_s and gpu_s else None, "agreement": agreement,
              "tf32_on_cuda": "allowed (dfq_deploy.device.synthesis_numerics; used from compute capability 8.0)"}
    logger.info("gpucheck: synthesis %.4f s/it on the CPU, %.4f s/it on CUDA; images within %.2e, losses within "
                "%.2e", cpu_s or 0.0, gpu_s or 0.0, agreement["images_max_abs"], agreement["loss_max_rel"])
    return result, gpu.images


# -- step 4: energy ------------------------------------------------------------------------------------------
def torch_pci_bus_id(index: int) -> str | None:
    """The PCI bus id (``"0000:01:00.0"``) of CUDA device ``index`` as torch reports it (no cuda-python needed)."""
    import torch

    try:
        p = torch.cuda.get_device_properties(index)
        return f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None


def _pci_bus_id(index: int) -> str | None:
    from dfq_deploy.bench.nvml import cuda_pci_bus_id

    return cuda_pci_bus_id(index) or torch_pci_bus_id(index)


def energy_check(model: Any, data_cfg: dict[str, Any], seconds: float = ENERGY_SECONDS,
                 batch: int = ENERGY_BATCH) -> dict[str, Any]:
    """Step 4: NVML energy per image of a forward loop of ``model`` on ``cuda:0``.

    Returns:
        the sampler's energy result (``joules_per_image`` ...) with ``batch``, ``images``, ``images_per_s`` and
        ``sampler``; or ``{"available": False, "reason": ...}`` when NVML cannot be read.
    """
    import torch

    from dfq_deploy.bench.nvml import NVMLSampler
    from dfq_deploy.bench.sampler import unavailable

    sampler = NVMLSampler(index=0, pci_bus_id=_pci_bus_id)
    reason = sampler.probe()
    if reason is not None:
        return unavailable(reason)
    device = torch.device("cuda", 0)
    x = torch.randn(batch, *data_cfg["input_size"], generator=torch.Generator().manual_seed(0)).to(device)
    home = next(model.parameters()).device
    model.to(device).eval()
    try:
        with torch.inference_mode():
            for _ in range(ENERGY_WARMUP):
                model(x)
            torch.cuda.synchronize(device)
            logger.info("gpucheck: energy, forward loop of batch %d for %.0f s", batch, seconds)
            sampler.start()
            try:
                images, t0 = 0, time.time()
                while time.time() - t0 < seconds:
                    model(x)
                    torch.cuda.synchronize(device)  # the window holds exactly the work counted in it
                    images += batch
                t1 = time.time()
            finally:
                sampler.stop()
    finally:
        model.to(home)
    res = sampler.energy([(t0, t1)], images)
    return {**res, "batch": batch, "images": images, "seconds": t1 - t0, "images_per_s": images / (t1 - t0),
            "precision": "fp32", "sampler": sampler.describe()}


# -- step 5: torchrun ----------------------------------------------------------------------------------------
def torchrun_check(outdir: str | Path, nproc: int, reference: Any = None, timeout_s: float = TORCHRUN_TIMEOUT_S,
                   device: str = "cuda") -> dict[str, Any]:
    """Step 5: ``torchrun`` of ``dfq-deploy synth`` on the GPU(s); it must finish and write its images.

    Args:
        outdir: the check's output folder (the run goes to ``outdir/torchrun-synth``).
        nproc: processes (one per GPU).
        reference: the in-process CUDA images of the same seed (step 2), to record how far apart they are.
        timeout_s: the launch may take this long before it counts as failed.
        device: ``--device`` of the launch (``cuda``; ``cpu`` runs the same launch on gloo, for tests).
    """
    import torch

    from dfq_deploy.synth import load_synth_dir

    out = Path(outdir) / TORCHRUN_DIR
    cmd = torchrun_command(out, nproc, device)
    package_root = str(Path(__file__).resolve().parents[1])  # the workers import this very package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    shown = " ".join(["torchrun", *cmd[3:]])
    result: dict[str, Any] = {"command": shown, "nproc": nproc, "expected_images": SYNTH_IMAGES, "output": str(out)}
    logger.info("gpucheck: %s", shown)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**result, "error": f"timed out after {timeout_s:g} s"}
    result.update(returncode=proc.returncode, seconds=time.perf_counter() - t0,
                  stderr_tail=[ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-5:])
    if proc.returncode != 0:
        return result
    try:
        calib = load_synth_dir(out)
        timing = json.loads((out / "config.json").read_text()).get("timing", {})
    except (DfqError, OSError, ValueError) as exc:
        return {**result, "error": f"the run wrote no readable images: {exc}"}
    images = calib.images
    result.update(images=int(images.shape[0]), finite=bool(torch.isfinite(images).all()),
                  processes=timing.get("processes"), backend=timing.get("backend"),
                  s_per_it=timing.get("seconds_per_iteration"))
    if reference is not None and tuple(reference.shape) == tuple(images.shape):
        result["max_abs_vs_in_process"] = float((reference - images).abs().max())
    return result


# -- the run -------------------------------------------------------------------------------------------------
def _step(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one step; an exception is that step's failure (recorded), not the end of the check."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any error of a step is reported in the summary
        first = (str(exc).strip().splitlines() or [""])[0]
        logger.error("gpucheck: %s failed: %s: %s", name, type(exc).__name__, first)
        logger.debug("gpucheck: %s", name, exc_info=True)
        return {"error": f"{type(exc).__name__}: {first}"}


def run_gpucheck(outdir: str | Path, tests_root: str | Path | None = None, skip: Collection[str] = (),
                 progress: bool = True) -> dict[str, Any]:
    """Run every step (see the module docstring) and write the summary; returns it.

    Args:
        outdir: where the JUnit XML, the torchrun run and the summary go.
        tests_root: the source checkout's tests folder (default :data:`TESTS_ROOT`).
        skip: steps the user leaves out (:data:`dfq_deploy.acceptance.SKIPPABLE`); recorded in the summary.
        progress: progress bars.

    Raises:
        DfqError: before any work, when the arguments or the machine cannot run the check.
    """
    check_arguments(outdir, skip)
    check_environment(skip)
    import torch

    from dfq_deploy.models import ModelSpec, create_model, data_config

    out = Path(outdir)
    t0 = time.perf_counter()
    with removed_if_left_empty(out):
        out.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"check": "gpu (no TensorRT)", **environment(), "skipped_by_request": sorted(skip),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        model = create_model(ModelSpec())
        cfg = data_config(model)
        total = 4 - len(skip)
        step = 1
        logger.info("gpucheck: [%d/%d] synthesis, CPU vs CUDA", step, total)
        synth = _step("synthesis", synthesis_check, model, cfg, progress=progress)
        reference = None
        if isinstance(synth, tuple):
            synth, reference = synth
        result["synthesis"] = synth
        if "gpu-tests" in skip:
            result["gpu_tests"] = {"ran": False, "reason": "left out by request (--skip-gpu-tests)"}
        else:
            step += 1
            logger.info("gpucheck: [%d/%d] CUDA tests (pytest -m gpu, up to %d s)", step, total,
                        GPU_TESTS_TIMEOUT_S)
            result["gpu_tests"] = _step("CUDA tests", run_gpu_tests, gpu_test_paths(tests_root), out,
                                        timeout_s=GPU_TESTS_TIMEOUT_S, report_name="gpucheck-tests.xml")
            logger.info("gpucheck: CUDA tests: %s", result["gpu_tests"].get("summary")
                        or result["gpu_tests"].get("reason"))
        if "energy" in skip:
            result["energy"] = {"available": False, "reason": "left out by request (--skip-energy)"}
        else:
            step += 1
            logger.info("gpucheck: [%d/%d] energy (NVML)", step, total)
            result["energy"] = _step("energy", energy_check, model, cfg)
        step += 1
        nproc = max(1, min(TORCHRUN_MAX_PROCS, torch.cuda.device_count()))
        logger.info("gpucheck: [%d/%d] torchrun, %d process(es)", step, total, nproc)
        result["torchrun"] = _step("torchrun", torchrun_check, out, nproc, reference)
        result["seconds"] = time.perf_counter() - t0
        write_summary(result, out)
    return result


# -- verdict and summary -------------------------------------------------------------------------------------
def failures(result: dict[str, Any]) -> list[str]:
    """Why the check fails: one line per step that failed or did not run (empty: passed).

    The synthesis must have run on both devices, timed, and agree within the tolerances; the CUDA tests must
    have run and passed (none skipped); the energy step must give joules per image; the torchrun launch must
    exit 0 and write every image, from as many processes as it started (on NCCL with two or more). Only the
    steps in ``result["skipped_by_request"]`` may be missing.
    """
    skip = set(result.get("skipped_by_request") or ())
    out = []
    synth = result.get("synthesis")
    if not synth:
        out.append("synthesis: did not run")
    elif "error" in synth:
        out.append(f"synthesis: {synth['error']}")
    else:
        for dev in ("cpu", "cuda"):
            if not (synth.get(dev) or {}).get("s_per_it"):
                out.append(f"synthesis: no time per iteration on {dev}")
        a = synth.get("agreement") or {}
        if not a:
            out.append("synthesis: the CPU and CUDA images were not compared")
        else:
            if not a.get("targets_equal"):
                out.append("synthesis: the CPU and CUDA targets differ (they are drawn on the CPU: they must be equal)")
            diff, atol = a.get("images_max_abs"), a.get("images_atol", IMAGES_ATOL)
            if diff is None or not diff < atol:  # NaN fails too
                out.append("synthesis: the CPU and CUDA images have other shapes" if diff is None else
                           f"synthesis: CPU and CUDA images differ by {diff:.3g} (tolerance {atol:g})")
            rel, rtol = a.get("loss_max_rel"), a.get("loss_rtol", LOSS_RTOL)
            if rel is None or not rel <= rtol:
                out.append("synthesis: the CPU and CUDA loss histories have other lengths" if rel is None else
                           f"synthesis: CPU and CUDA losses differ by {100 * rel:.3g}% of the CPU's (tolerance "
                           f"{100 * rtol:g}%)")
    tests = result.get("gpu_tests") or {}
    if "gpu-tests" not in skip:
        if "error" in tests:
            out.append(f"CUDA tests: {tests['error']}")
        elif not tests.get("ran"):
            out.append(f"CUDA tests did not run: {tests.get('reason', 'no result')}")
        elif not tests.get("passed"):
            out.append(f"CUDA tests failed: {tests.get('summary')}")
    if "energy" not in skip:
        energy = result.get("energy")
        if not energy:
            out.append("energy: did not run (--skip-energy leaves energy out)")
        elif "error" in energy:
            out.append(f"energy: {energy['error']}")
        elif energy.get("joules_per_image") is None:
            out.append(f"energy: {energy.get('reason', 'not measured')} (--skip-energy leaves energy out)")
    run = result.get("torchrun")
    if not run:
        out.append("torchrun: did not run")
    elif "error" in run:
        out.append(f"torchrun: {run['error']}")
    elif run.get("returncode") != 0:
        last = (run.get("stderr_tail") or ["no output"])[-1]
        out.append(f"torchrun: exit code {run.get('returncode')}: {last}")
    else:
        if run.get("images") != run.get("expected_images") or not run.get("finite"):
            out.append(f"torchrun: wrote {run.get('images')} images, expected {run.get('expected_images')} finite "
                       "ones")
        if run.get("processes") != run.get("nproc"):
            out.append(f"torchrun: {run.get('processes')} process(es) synthesised, {run.get('nproc')} were started")
        elif run.get("backend") != "nccl":
            out.append(f"torchrun: backend {run.get('backend')}, expected nccl on CUDA")
    return out


def passed(result: dict[str, Any]) -> bool:
    """No check failed and none was left out except by request (:func:`failures`)."""
    return not failures(result)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def summary_markdown(result: dict[str, Any]) -> str:
    """The Markdown summary of a run (also used on recorded results)."""
    gpu = result.get("gpu") or {}
    head = (f"- GPU {gpu.get('name', '?')} (compute capability {gpu.get('compute_capability', '?')}, "
            f"{gpu.get('memory_gb', '?')} GiB; {result.get('gpu_count', '?')} GPU(s)); torch {result.get('torch')}, "
            f"CUDA {result.get('cuda')}, NCCL {result.get('nccl') or 'none'}")
    seconds = result.get("seconds")
    lines = ["# GPU check (no TensorRT)", "", head]
    if seconds is not None:
        lines.append(f"- {seconds:.0f} s" + (f" (over the {TARGET_SECONDS} s target)" if seconds > TARGET_SECONDS
                                              else ""))
    lines.append(f"- verdict: **{'passed' if passed(result) else 'FAILED'}**")
    lines += [f"  - {why}" for why in failures(result)]
    if result.get("skipped_by_request"):
        lines.append(f"- left out by request: {', '.join(result['skipped_by_request'])}")

    synth = result.get("synthesis") or {}
    lines += ["", "## Synthesis, CPU vs CUDA", ""]
    if "error" in synth or not synth:
        lines.append(f"- failed: {synth.get('error', 'did not run')}")
    else:
        lines.append(f"{synth.get('method')} on {synth.get('model')}, {synth.get('images')} images x "
                     f"{synth.get('iterations')} iterations, seed {synth.get('seed')}, {synth.get('precision')}:")
        lines += ["", "| device | s / iteration | peak GPU memory |", "| --- | --- | --- |"]
        cpu, cuda = synth.get("cpu") or {}, synth.get("cuda") or {}
        peak = cuda.get("peak_memory_bytes")
        lines.append(f"| CPU ({cpu.get('threads', '?')} threads) | {_fmt(cpu.get('s_per_it'))} | |")
        lines.append(f"| {(cuda.get('device') or {}).get('device', 'cuda')} | {_fmt(cuda.get('s_per_it'))} | "
                     f"{_fmt(peak / 2**20 if peak else None, '.0f')} MiB |")
        a = synth.get("agreement") or {}
        lines += ["", f"- CUDA {_fmt(synth.get('speedup'), '.1f')}x the CPU's speed; targets "
                      f"{'equal' if a.get('targets_equal') else 'DIFFER'}; images within "
                      f"{_fmt(a.get('images_max_abs'), '.2e')} (tolerance {a.get('images_atol', IMAGES_ATOL):g}); "
                      f"losses within {_fmt(a.get('loss_max_rel'), '.2e')} of the CPU's (tolerance "
                      f"{a.get('loss_rtol', LOSS_RTOL):g})"]
        if a.get("pixels_over_atol"):
            lines.append(f"- {a['pixels_over_atol']} of {a.get('pixels')} pixels beyond the tolerance, mean "
                         f"|difference| {_fmt(a.get('images_mean_abs'), '.2e')} (a few pixels far apart: gradients "
                         "near zero whose sign differs between the devices, e.g. under TF32, which synthesis allows "
                         "on CUDA)")

    tests = result.get("gpu_tests") or {}
    lines += ["", "## CUDA tests (no TensorRT)", "",
              f"- {tests.get('summary') if tests.get('ran') else tests.get('reason') or tests.get('error', 'not run')}"]
    lines += [f"  - skipped: {why}" for why in tests.get("skip_reasons", [])]

    energy = result.get("energy") or {}
    lines += ["", "## Energy (NVML), PyTorch forward loop", ""]
    if energy.get("joules_per_image") is None:
        lines.append(f"- not measured: {energy.get('reason') or energy.get('error') or 'did not run'}")
    else:
        lines += ["| batch | images / s | J / image | average W | window s | method |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {energy.get('batch')} | {_fmt(energy.get('images_per_s'), '.0f')} | "
                  f"{_fmt(energy.get('joules_per_image'), '.3e')} | {_fmt(energy.get('avg_watts'), '.1f')} | "
                  f"{_fmt(energy.get('window_s'), '.1f')} | {energy.get('method', '?')} |"]
        lines += [f"- warning: {w}" for w in energy.get("warnings", [])]

    run = result.get("torchrun") or {}
    lines += ["", "## torchrun", ""]
    if not run:
        lines.append("- did not run")
    else:
        lines.append(f"- `{run.get('command')}`")
        if "error" in run:
            lines.append(f"- failed: {run['error']}")
        else:
            lines.append(f"- exit code {run.get('returncode')} after {_fmt(run.get('seconds'), '.0f')} s; "
                         f"{run.get('images', 0)} of {run.get('expected_images')} images; "
                         f"{run.get('processes', '?')} process(es), backend {run.get('backend', '?')}")
            if run.get("max_abs_vs_in_process") is not None:
                lines.append(f"- images within {run['max_abs_vs_in_process']:.2e} of the in-process CUDA run")
            if run.get("returncode") != 0:
                lines += [f"  - {ln}" for ln in run.get("stderr_tail", [])]
    return "\n".join(lines) + "\n"


def write_summary(result: dict[str, Any], outdir: str | Path) -> list[Path]:
    """``gpucheck.json`` and ``gpucheck.md`` in ``outdir``, written atomically."""
    out = Path(outdir)
    result = {**result, "passed": passed(result), "failures": failures(result)}
    atomic_write_json(out / SUMMARY_FILES[0], result)
    atomic_write_text(out / SUMMARY_FILES[1], summary_markdown(result))
    return [out / f for f in SUMMARY_FILES]


__all__ = [
    "CUDA_TEST_FILES",
    "SKIPPABLE",
    "check_arguments",
    "check_environment",
    "compare_synthesis",
    "failures",
    "gpucheck_plan",
    "passed",
    "run_gpucheck",
    "summary_markdown",
    "write_summary",
]
