"""The GPU acceptance run (``dfq-deploy acceptance OUTDIR``): the first thing to run on a new board or GPU.

Top to bottom, on a machine with an NVIDIA GPU and TensorRT >= 10:

1. check TensorRT and the GPU at once (one line naming what is missing, before any work);
2. export the bundled model three times (:data:`EXPORTS`: the FP16 float graph, W8A8, W4A16; FP16-typed, each
   with its ONNX Runtime accuracy on ``dev`` in ``report.json``), the quantized ones from one data-free
   calibration set synthesised once with the export's defaults;
3. build each engine (strongly typed, batch 1..32, one shared timing cache);
4. measure each engine's top-1 on the same ``dev`` images and compare it with the ONNX Runtime figure
   (:data:`ACCURACY_TOLERANCE_POINTS`);
5. run the GPU tests (``pytest -m gpu tests/trt``) when the source tree is there;
6. benchmark latency (batch 1/8/32, interleaved) and energy where the board exposes it;
7. write ``acceptance.json`` and ``acceptance.md`` (atomically), and return non-zero when a check failed.

Only steps 1, the plan and the summary writer run without a GPU; they are what the tests here cover.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfq_deploy.config import CalibrationConfig
from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: (name, ``export --bits``, ``build --precision``) of the acceptance engines.
EXPORTS = (("fp16", 16, "fp16"), ("w8a8", 8, "int8"), ("w4a16", 4, "int4"))
#: An engine's top-1 may differ from ONNX Runtime's on the same images by at most this many points.
ACCURACY_TOLERANCE_POINTS = 1.0
BATCHES = (1, 8, 32)
#: Timed seconds per engine and batch size in the latency step.
BENCH_SECONDS = 5.0
TESTS_DIR = Path(__file__).resolve().parents[2] / "tests" / "trt"
#: The GPU tests may take this long before they count as failed.
GPU_TESTS_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Step:
    """One step of the run: ``name`` and the artifacts it reads and writes."""

    name: str
    detail: str


def acceptance_plan(outdir: str | Path, data: str | Path, limit: int | None = None) -> list[Step]:
    """The steps :func:`run_acceptance` takes, in order (no TensorRT needed)."""
    out = Path(outdir)
    images = f"{limit} images of {data}" if limit else f"all of {data}"
    steps = [Step("check", "TensorRT >= 10 and an NVIDIA GPU")]
    for name, bits, _ in EXPORTS:
        steps.append(Step(f"export {name}", f"dfq-deploy export --bits {bits} -> {out / name / 'model.onnx'} "
                                            f"(ONNX Runtime top-1 on {images})"))
    for name, _, precision in EXPORTS:
        steps.append(Step(f"build {name}", f"--precision {precision} --batch 1,8,32 -> {out / name / 'model.engine'}"))
        steps.append(Step(f"accuracy {name}", f"engine top-1 on {images}, within "
                                              f"{ACCURACY_TOLERANCE_POINTS:g} points of ONNX Runtime's"))
    steps.append(Step("gpu tests", f"pytest -m gpu {TESTS_DIR}" if TESTS_DIR.is_dir() else "skipped: no source tree"))
    steps.append(Step("latency", f"batches {','.join(map(str, BATCHES))}, {BENCH_SECONDS:g} s each, interleaved, "
                                 "energy where measurable"))
    steps.append(Step("summary", f"{out / 'acceptance.json'}, {out / 'acceptance.md'}"))
    return steps


def check_environment() -> None:
    """Raise one line naming what is missing (TensorRT, a usable GPU, or a TensorRT older than 10)."""
    from dfq_deploy.trt.env import TRT_MISSING_MESSAGE, gpu_available, tensorrt_version

    version = tensorrt_version()
    problems = [] if version is not None else [TRT_MISSING_MESSAGE]
    ok, reason = gpu_available()
    if not ok:
        problems.append(f"no usable NVIDIA GPU ({reason})")
    if problems:
        raise DfqError("the GPU acceptance run cannot start: " + "; ".join(problems))
    from dfq_deploy.trt.planner import check_trt_version

    check_trt_version(str(version))


def compare_accuracy(onnx_top1: float, engine_top1: float,
                     tolerance_points: float = ACCURACY_TOLERANCE_POINTS) -> dict[str, Any]:
    """The engine-vs-ONNX-Runtime accuracy check of one export."""
    delta = 100 * (engine_top1 - onnx_top1)
    return {"onnxruntime_top1": onnx_top1, "engine_top1": engine_top1, "delta_points": delta,
            "tolerance_points": tolerance_points, "passed": abs(delta) <= tolerance_points}


def run_acceptance(outdir: str | Path, data: str | Path, limit: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run every step (see the module docstring) and write the summary; returns it."""
    from dfq_deploy.bench.accuracy import evaluate_engine
    from dfq_deploy.bench.latency import run_benchmark
    from dfq_deploy.bench.power import auto_sampler
    from dfq_deploy.data import ImageFolder
    from dfq_deploy.models import ModelSpec
    from dfq_deploy.pipeline import ExportOptions, export_model
    from dfq_deploy.synth import synthesize_default
    from dfq_deploy.trt import build_engine, plan_build
    from dfq_deploy.trt.env import gpu_info, tensorrt_version

    check_environment()
    ImageFolder(data)  # a missing or empty data folder fails now, not after the synthesis
    out = Path(outdir)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"tensorrt": tensorrt_version(), "gpu": gpu_info(), "data": str(data), "limit": limit,
                              "exports": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    engines = []
    synth = synthesize_default(ModelSpec(), out / "synth", ExportOptions.num_samples, progress=progress)  # once
    for name, bits, precision in EXPORTS:
        try:  # a failed export, build or evaluation is a failed check of this export; the others still run
            logger.warning("acceptance: export %s", name)
            calibration = CalibrationConfig(calib_from=str(synth) if bits < 16 else None)
            report = export_model(ExportOptions(bits=bits, calibration=calibration, output=out / name, eval_data=data,
                                                eval_limit=limit, progress=progress))
            logger.warning("acceptance: build %s", name)
            plan = plan_build(report["artifact"], precision, batch=BATCHES,  # (min, opt, max)
                              timing_cache=out / "timing.cache", output=out / name / "model.engine")
            engine = build_engine(plan)
            acc = evaluate_engine(engine, data, limit, progress=progress)
        except DfqError as exc:
            logger.error("acceptance: %s failed: %s", name, exc)
            result["exports"][name] = {"error": str(exc), "parity_passed": False}
            continue
        engines.append(engine)
        result["exports"][name] = {"onnx": report["artifact"], "engine": str(engine), "dtype": report["dtype"],
                                   "parity_passed": report["parity"]["passed"],
                                   "accuracy": compare_accuracy(report["accuracy"]["top1"], acc["top1"])}
    result["gpu_tests"] = run_gpu_tests()
    result["latency"] = []
    if engines:
        bench = run_benchmark(engines, runtime="trt", batches=BATCHES, seconds=BENCH_SECONDS, progress=progress,
                              power_sampler=auto_sampler())
        result["latency"] = [{"name": a["name"], "batches": [{k: v for k, v in b.items() if k != "samples_s"}
                                                             for b in a["batches"]]} for a in bench["artifacts"]]
    result["seconds"] = time.perf_counter() - t0
    write_summary(result, out)
    return result


def run_gpu_tests() -> dict[str, Any]:
    """``pytest -m gpu tests/trt`` in a subprocess, when the source tree is there."""
    if not TESTS_DIR.is_dir():
        return {"ran": False, "reason": f"{TESTS_DIR} not found (installed without the source tree)"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", str(TESTS_DIR)],
                              capture_output=True, text=True, check=False, timeout=GPU_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ran": True, "passed": False, "summary": f"timed out after {GPU_TESTS_TIMEOUT_S} s"}
    if proc.returncode == 5:  # pytest: no tests collected
        return {"ran": False, "reason": f"no GPU tests collected in {TESTS_DIR}"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return {"ran": True, "passed": proc.returncode == 0, "summary": lines[-1] if lines else proc.stderr[-500:]}


def passed(result: dict[str, Any]) -> bool:
    """Every export's accuracy check, its parity and the GPU tests (when they ran) passed."""
    ok = bool(result["exports"]) and all("error" not in e and e["accuracy"]["passed"] and e["parity_passed"]
                                         for e in result["exports"].values())
    tests = result.get("gpu_tests", {})
    return ok and (not tests.get("ran") or bool(tests.get("passed")))


def summary_markdown(result: dict[str, Any]) -> str:
    """The Markdown summary of a run (also used on recorded results)."""
    gpu = result.get("gpu", {})
    lines = ["# GPU acceptance", "",
             f"- TensorRT {result.get('tensorrt')}; GPU {gpu.get('name', '?')}; data {result.get('data')}"
             + (f" ({result['limit']} images)" if result.get("limit") else ""),
             f"- verdict: **{'passed' if passed(result) else 'FAILED'}**", "",
             "| export | dtype | ONNX Runtime top-1 | engine top-1 | difference | within tolerance | parity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in result["exports"].items():
        if "error" in e:
            lines.append(f"| {name} | | | | | NO | failed: {e['error']} |")
            continue
        a = e["accuracy"]
        lines.append(f"| {name} | {e['dtype']} | {100 * a['onnxruntime_top1']:.2f} | {100 * a['engine_top1']:.2f} | "
                     f"{a['delta_points']:+.2f} | {'yes' if a['passed'] else 'NO'} | "
                     f"{'passed' if e['parity_passed'] else 'FAILED'} |")
    tests = result.get("gpu_tests", {})
    lines += ["", f"- GPU tests: {tests.get('summary') if tests.get('ran') else tests.get('reason', 'not run')}"]
    if result.get("latency"):
        lines += ["", "| engine | batch | p50 ms | img/s | J/img |", "| --- | --- | --- | --- | --- |"]
        for a in result["latency"]:
            for b in a["batches"]:
                if "skipped" in b:
                    lines.append(f"| {a['name']} | {b['batch']} | skipped: {b['skipped']} | | |")
                    continue
                lat, energy = b.get("latency") or {}, (b.get("energy") or {}).get("joules_per_image")
                lines.append(f"| {a['name']} | {b['batch']} | {_fmt(lat.get('p50_ms'))} | "
                             f"{_fmt(lat.get('throughput_ips'), 1)} | {_fmt(energy, 4)} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_summary(result: dict[str, Any], outdir: str | Path) -> list[Path]:
    """``acceptance.json`` and ``acceptance.md`` in ``outdir``, written atomically."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "passed": passed(result)}
    atomic_write_json(out / "acceptance.json", result)
    atomic_write_text(out / "acceptance.md", summary_markdown(result))
    return [out / "acceptance.json", out / "acceptance.md"]
