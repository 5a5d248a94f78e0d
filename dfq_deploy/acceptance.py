"""The GPU acceptance run (``dfq-deploy acceptance OUTDIR``): the first thing to run on a new board or GPU.

Top to bottom, on a machine with an NVIDIA GPU and TensorRT >= 10:

1. check TensorRT and the GPU at once (one line naming what is missing, before any work);
2. export the bundled model three times (:data:`EXPORTS`: the FP16 float graph, W8A8, W4A16; FP16-typed, each
   with its ONNX Runtime accuracy on ``dev`` in ``report.json``), the quantized ones from one data-free
   calibration set synthesised once with the export's defaults;
3. build each engine (strongly typed, batch 1..32, one shared timing cache);
4. measure each engine's top-1 on the same ``dev`` images and compare it with the ONNX Runtime figure
   (:data:`ACCURACY_TOLERANCE_POINTS`);
5. run the GPU tests (``pytest -m gpu tests/trt`` of the source checkout, or ``--tests DIR``);
6. benchmark latency (batch 1/8/32, interleaved) and energy;
7. write ``acceptance.json`` and ``acceptance.md`` (atomically), and return non-zero when a check failed.

A check that was asked for and did not run is a failure, never a pass (:func:`failures`): GPU tests that cannot
be found, none collected or any of them skipped; an export, build or evaluation that raised; a batch size
without a latency; a latency without energy. Only the user can leave a step out (``--skip-gpu-tests``,
``--skip-energy``), and the summary says so.

Only step 1, the plan and the verdict run without a GPU; they are what the tests here cover.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Sequence
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
#: The GPU tests of the source checkout this package runs from (``<repo>/dfq_deploy/acceptance.py`` ->
#: ``<repo>/tests/trt``); an install without the source tree has none: pass ``--tests DIR``.
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests" / "trt"
#: The GPU tests may take this long before they count as failed.
GPU_TESTS_TIMEOUT_S = 1800
#: Steps a user may leave out (``--skip-gpu-tests``, ``--skip-energy``); every other one must run.
SKIPPABLE = ("gpu-tests", "energy")


@dataclass(frozen=True)
class Step:
    """One step of the run: ``name`` and the artifacts it reads and writes."""

    name: str
    detail: str


def acceptance_plan(outdir: str | Path, data: str | Path, limit: int | None = None,
                    tests_dir: str | Path | None = None, skip: Collection[str] = ()) -> list[Step]:
    """The steps :func:`run_acceptance` takes, in order (no TensorRT needed)."""
    check_skip(skip)
    out = Path(outdir)
    tests = Path(tests_dir) if tests_dir is not None else TESTS_DIR
    images = f"{limit} images of {data}" if limit else f"all of {data}"
    steps = [Step("check", "TensorRT >= 10 and an NVIDIA GPU")]
    for name, bits, _ in EXPORTS:
        steps.append(Step(f"export {name}", f"dfq-deploy export --bits {bits} -> {out / name / 'model.onnx'} "
                                            f"(ONNX Runtime top-1 on {images})"))
    for name, _, precision in EXPORTS:
        steps.append(Step(f"build {name}", f"--precision {precision} --batch 1,8,32 -> {out / name / 'model.engine'}"))
        steps.append(Step(f"accuracy {name}", f"engine top-1 on {images}, within "
                                              f"{ACCURACY_TOLERANCE_POINTS:g} points of ONNX Runtime's"))
    if "gpu-tests" in skip:
        steps.append(Step("gpu tests", "left out (--skip-gpu-tests)"))
    else:
        steps.append(Step("gpu tests", f"pytest -m gpu {tests}" if tests.is_dir() else
                          f"NOT FOUND: {tests} (the run will fail; pass --tests DIR or --skip-gpu-tests)"))
    steps.append(Step("latency", f"batches {','.join(map(str, BATCHES))}, {BENCH_SECONDS:g} s each, interleaved, "
                                 + ("energy left out (--skip-energy)" if "energy" in skip else "with energy")))
    steps.append(Step("summary", f"{out / 'acceptance.json'}, {out / 'acceptance.md'}"))
    return steps


def check_skip(skip: Collection[str]) -> None:
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        raise DfqError(f"cannot leave out {', '.join(unknown)}: only {', '.join(SKIPPABLE)} may be skipped")


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


def run_acceptance(outdir: str | Path, data: str | Path, limit: int | None = None, progress: bool = True,
                   tests_dir: str | Path | None = None, skip: Collection[str] = ()) -> dict[str, Any]:
    """Run every step (see the module docstring) and write the summary; returns it.

    Args:
        outdir: where the exports, engines and the summary go.
        data: ImageFolder for the accuracy checks.
        limit: a seeded subset of this many images.
        progress: progress bars.
        tests_dir: the GPU tests (default :data:`TESTS_DIR`).
        skip: steps the user leaves out (:data:`SKIPPABLE`); recorded in the summary.
    """
    from dfq_deploy.bench.accuracy import evaluate_engine
    from dfq_deploy.bench.latency import run_benchmark
    from dfq_deploy.bench.power import auto_sampler
    from dfq_deploy.data import ImageFolder
    from dfq_deploy.models import ModelSpec
    from dfq_deploy.pipeline import ExportOptions, export_model
    from dfq_deploy.synth import synthesize_default
    from dfq_deploy.trt import build_engine, plan_build
    from dfq_deploy.trt.commands import nvidia_commands
    from dfq_deploy.trt.env import gpu_info, tensorrt_version

    check_skip(skip)
    check_environment()
    ImageFolder(data)  # a missing or empty data folder fails now, not after the synthesis
    out = Path(outdir)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"tensorrt": tensorrt_version(), "gpu": gpu_info(), "data": str(data), "limit": limit,
                              "exports": {}, "skipped_by_request": sorted(skip),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    engines = []
    synth = synthesize_default(ModelSpec(), out / "synth", CalibrationConfig().num_samples, progress=progress)
    for name, bits, precision in EXPORTS:
        try:  # a failed export, build or evaluation is a failed check of this export; the others still run
            logger.warning("acceptance: export %s", name)
            calibration = CalibrationConfig(calib_from=str(synth) if bits < 16 else None)
            report = export_model(ExportOptions(bits=bits, calibration=calibration, output=out / name, eval_data=data,
                                                eval_limit=limit, progress=progress))
            logger.warning("acceptance: build %s", name)
            plan = plan_build(report["artifact"], precision, batch=BATCHES,  # one profile per batch size
                              timing_cache=out / "timing.cache", output=out / name / "model.engine")
            engine = build_engine(plan)
            acc = evaluate_engine(engine, data, limit, progress=progress)
        except DfqError as exc:
            logger.error("acceptance: %s failed: %s", name, exc)
            result["exports"][name] = {"error": str(exc), "parity_passed": False}
            continue
        engines.append((name, engine))
        result["exports"][name] = {"onnx": report["artifact"], "engine": str(engine), "dtype": report["dtype"],
                                   "parity_passed": report["parity"]["passed"],
                                   "accuracy": compare_accuracy(report["accuracy"]["top1"], acc["top1"]),
                                   "polygraphy": nvidia_commands(plan)["polygraphy"]}
    result["gpu_tests"] = ({"ran": False, "reason": "left out by request (--skip-gpu-tests)"} if "gpu-tests" in skip
                           else run_gpu_tests(tests_dir, out))
    result["latency"] = []
    if engines:
        bench = run_benchmark([e for _, e in engines], runtime="trt", batches=BATCHES, seconds=BENCH_SECONDS,
                              progress=progress, power_sampler=None if "energy" in skip else auto_sampler())
        result["latency"] = [{"export": name, "name": a["name"],
                              "batches": [{k: v for k, v in b.items() if k != "samples_s"} for b in a["batches"]]}
                             for (name, _), a in zip(engines, bench["artifacts"], strict=True)]
    result["seconds"] = time.perf_counter() - t0
    write_summary(result, out)
    return result


def run_gpu_tests(tests_dir: str | Path | Sequence[str | Path] | None = None, out: str | Path | None = None,
                  timeout_s: float = GPU_TESTS_TIMEOUT_S, report_name: str = "gpu-tests.xml") -> dict[str, Any]:
    """``pytest -m gpu`` on ``tests_dir`` (default :data:`TESTS_DIR`) in one process, counted from its JUnit XML.

    Args:
        tests_dir: a folder of tests, or several test files or folders (all of them must exist).
        out: where the JUnit XML goes (default: the working directory).
        timeout_s: the tests may take this long before they count as failed.
        report_name: the JUnit XML's file name in ``out``.

    Returns:
        ``{"ran", "passed", "counts", "summary"}``; ``ran`` is False (a failure of the run) when a path is
        missing or no test was collected, and ``passed`` is False when any test failed, errored or was skipped
        (on the GPU machine a skipped GPU test is a check that did not run).
    """
    if tests_dir is None or isinstance(tests_dir, (str, Path)):
        targets = [Path(tests_dir) if tests_dir is not None else TESTS_DIR]
    else:
        targets = [Path(t) for t in tests_dir]
    missing = [str(t) for t in targets if not t.exists()]
    if missing or not targets:
        return {"ran": False, "reason": f"GPU tests not found at {', '.join(missing) or 'no path given'} (an "
                                        "install without the source tree): pass --tests DIR, or --skip-gpu-tests "
                                        "to leave them out"}
    report = Path(out or ".") / report_name
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "gpu", "-q", "-rs",
           f"--junitxml={report}", *map(str, targets)]  # addopts cleared: no -m 'not slow', no parallel workers
    where = ", ".join(map(str, targets))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ran": True, "passed": False, "summary": f"timed out after {timeout_s:g} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-500:]
    counts = junit_counts(report) if report.is_file() else None
    if counts is None or counts["tests"] == 0:
        return {"ran": False, "counts": counts, "reason": f"no GPU tests collected in {where} (pytest exit "
                                                          f"{proc.returncode}: {summary})"}
    ran = counts["tests"] - counts["skipped"]
    ok = proc.returncode == 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0
    result = {"ran": ran > 0, "passed": ok, "counts": counts, "summary": summary}
    if counts["skipped"]:
        result["skip_reasons"] = counts["skip_reasons"]
    if not ran:
        result["reason"] = f"all {counts['tests']} collected tests skipped ({'; '.join(counts['skip_reasons'])})"
    return result


def junit_counts(path: str | Path) -> dict[str, Any]:
    """Tests, failures, errors and skips (with their reasons) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors",
                                                                                 "skipped")}
    counts["skip_reasons"] = sorted({el.get("message", "") for el in root.iter("skipped")})
    return counts


def failures(result: dict[str, Any]) -> list[str]:
    """Why the run fails: one line per check that failed or did not run (empty: passed).

    Every export of :data:`EXPORTS` must report parity and an engine accuracy within tolerance, the GPU tests
    must have run and passed, every engine must have a latency at every batch size of :data:`BATCHES`, and each
    of those an energy figure; only the steps in ``result["skipped_by_request"]`` may be missing.
    """
    skip = set(result.get("skipped_by_request") or ())
    out = []
    exports = result.get("exports") or {}
    for name, _, _ in EXPORTS:
        e = exports.get(name)
        if e is None:
            out.append(f"export {name}: did not run")
        elif "error" in e:
            out.append(f"export {name}: {e['error']}")
        else:
            if not e.get("parity_passed"):
                out.append(f"export {name}: parity failed")
            acc = e.get("accuracy") or {}
            if not acc.get("passed"):
                out.append(f"export {name}: engine top-1 not within {ACCURACY_TOLERANCE_POINTS:g} points of ONNX "
                           "Runtime's" if acc else f"export {name}: no engine accuracy")
    tests = result.get("gpu_tests") or {}
    if "gpu-tests" not in skip:
        if not tests.get("ran"):
            out.append(f"GPU tests did not run: {tests.get('reason', 'no result')}")
        elif not tests.get("passed"):
            out.append(f"GPU tests failed: {tests.get('summary')}")
    timed = {a.get("export", a.get("name")): a for a in result.get("latency") or []}
    for name, e in exports.items():
        if "engine" not in e:
            continue
        batches = {b.get("batch"): b for b in (timed.get(name) or {}).get("batches", [])}
        for b in BATCHES:
            entry = batches.get(b)
            if entry is None or "skipped" in entry or not (entry.get("latency") or {}).get("p50_ms"):
                why = (entry or {}).get("skipped", "not measured")
                out.append(f"latency {name} batch {b}: {why}")
            elif "energy" not in skip and (entry.get("energy") or {}).get("joules_per_image") is None:
                why = (entry.get("energy") or {}).get("reason", "not measured")
                out.append(f"energy {name} batch {b}: {why} (--skip-energy leaves energy out)")
    return out


def passed(result: dict[str, Any]) -> bool:
    """No check failed and none was left out except by request (:func:`failures`)."""
    return not failures(result)


def summary_markdown(result: dict[str, Any]) -> str:
    """The Markdown summary of a run (also used on recorded results)."""
    gpu = result.get("gpu", {})
    lines = ["# GPU acceptance", "",
             f"- TensorRT {result.get('tensorrt')}; GPU {gpu.get('name', '?')}; data {result.get('data')}"
             + (f" ({result['limit']} images)" if result.get("limit") else ""),
             f"- verdict: **{'passed' if passed(result) else 'FAILED'}**"]
    lines += [f"  - {why}" for why in failures(result)]
    if result.get("skipped_by_request"):
        lines.append(f"- left out by request: {', '.join(result['skipped_by_request'])}")
    lines += ["",
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
    checks = [(name, e["polygraphy"]) for name, e in result["exports"].items() if e.get("polygraphy")]
    if checks:
        lines += ["", "Where the engine and ONNX Runtime disagree, compare them layer by layer with NVIDIA's "
                      "Polygraphy (`pip install polygraphy`), in the same image:", ""]
        lines += [f"- {name}: `{cmd}`" for name, cmd in checks]
    tests = result.get("gpu_tests", {})
    lines += ["", f"- GPU tests: {tests.get('summary') if tests.get('ran') else tests.get('reason', 'not run')}"]
    lines += [f"  - skipped: {why}" for why in tests.get("skip_reasons", [])]
    if result.get("latency"):
        lines += ["", "| engine | batch | p50 ms | img/s | J/img |", "| --- | --- | --- | --- | --- |"]
        for a in result["latency"]:
            label = a.get("export", a["name"])
            for b in a["batches"]:
                if "skipped" in b:
                    lines.append(f"| {label} | {b['batch']} | skipped: {b['skipped']} | | |")
                    continue
                lat, energy = b.get("latency") or {}, (b.get("energy") or {}).get("joules_per_image")
                lines.append(f"| {label} | {b['batch']} | {_fmt(lat.get('p50_ms'))} | "
                             f"{_fmt(lat.get('throughput_ips'), 1)} | {_fmt(energy, 4)} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_summary(result: dict[str, Any], outdir: str | Path) -> list[Path]:
    """``acceptance.json`` and ``acceptance.md`` in ``outdir``, written atomically."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "passed": passed(result), "failures": failures(result)}
    atomic_write_json(out / "acceptance.json", result)
    atomic_write_text(out / "acceptance.md", summary_markdown(result))
    return [out / "acceptance.json", out / "acceptance.md"]
