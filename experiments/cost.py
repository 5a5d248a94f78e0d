"""Compute cost of data-free synthesis and of the closed-form corrections, measured in one process.

Three measurements, written to ``experiments/results/cost-<model>.json`` (atomically) and printed as tables:

1. **Synthesis cost per iteration vs a plain forward+backward.** For every registered synthesis method
   (``spdfq`` twice: Multi-Semantic Reinforcement off and on) the real code path
   (:func:`dfq_deploy.synth.synthesize`) runs ``--iters`` iterations; the wall time of each iteration is
   the time between consecutive optimizer steps (a global ``torch.optim`` step post-hook), so model probing,
   target drawing and other setup are not counted. The baseline is one forward + backward of the same model on
   the same number of images of the same size (cross-entropy on random targets, gradient w.r.t. the input
   images, the model in synthesis mode: eval, unfused attention, frozen weights; no optimizer step). Baseline
   and method blocks alternate (baseline, method, baseline, method, ...) after an untimed warm-up round; the
   first ``--warmup`` iterations of every block (and of every curriculum stage) are dropped. A method's
   seconds/iteration is the median of its kept iterations, per stage, weighted by the stage's share of the
   method's default schedule (DFQ-ViT: 30% low-resolution global stage, 70% detail stage; its hard stage needs
   a student and is not run). The ratio is method / its adjacent baseline, median over ``--repeats``.
2. **Peak memory of synthesis** (DeiT-T at 224 by default, random weights) for every method, each in a fresh
   subprocess of this script running ``--memory-iters`` iterations: peak RSS (``ru_maxrss``) and peak RSS minus
   the RSS after model creation.
3. **Closed-form correction fitting vs synthesis.** ``quantize_`` (the code ``export`` runs) on the
   same model and sample count, W4A16 and W8A8, ``correct`` none/bias/diag/full, and ``diag`` with block-wise
   reconstruction; its stage timings are compared with each method's synthesis time, taken as the measured
   seconds/iteration x the method's default iteration count.

Usage:
    OMP_NUM_THREADS=1 python experiments/cost.py --threads 1                # bundled model, 32 images
    OMP_NUM_THREADS=1 python experiments/cost.py --threads 1 --skip-memory --repeats 2 --note "busy machine"
    python experiments/cost.py --model deit_t --model-kwargs img_size=32,patch_size=4,depth=1,num_classes=10 \\
        --random-weights --num-samples 2 --repeats 1 --iters 5 --warmup 1 --skip-memory   # harness test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq_deploy.bench.report import cpu_model
from dfq_deploy.bench.synth_cost import StepTimer, drop_warmup, time_baseline
from dfq_deploy.config import CorrectionConfig, preset
from dfq_deploy.models import BUNDLED_MODEL, ModelSpec, create_model, data_config, parse_model_kwargs
from dfq_deploy.quant.correct import MODES
from dfq_deploy.quant.recipe import held_back_noise, quantize_
from dfq_deploy.synth import METHODS, method_options, synthesize
from dfq_deploy.synth.method import get_method, synthesis_mode
from dfq_deploy.synth.schedule import Stage
from dfq_deploy.utils import atomic_write_json

logger = logging.getLogger("bench.cost")
ROOT = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
#: The issue's targets for method / baseline seconds per iteration.
TARGET_RATIO = {"psaq": 1.3, "spdfq-msr-off": 1.3, "spdfq-msr-on": 2.3}
#: The issue's target for correction fitting time / synthesis time.
TARGET_FIT_SHARE = 0.10
CORRECTION_PRESETS = ("W4A16", "W8A8")
RECONSTRUCT_CORRECT = "diag"
KB = 1024


@dataclass(frozen=True)
class Variant:
    """One synthesis configuration to time: a registered method plus option overrides."""

    key: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def variants() -> list[Variant]:
    """Every registered synthesis method; ``spdfq`` with Multi-Semantic Reinforcement off, on (one crop per image
    and step, the default) and with all of an image's crops every step."""
    out = []
    for name in ("psaq", "spdfq", "dfqvit", *METHODS.names()):
        if any(v.method == name for v in out):
            continue
        if name == "spdfq":
            out.append(Variant("spdfq-msr-off", "spdfq", {"msr": False}, "SpdfqOptions.msr=False"))
            out.append(Variant("spdfq-msr-on", "spdfq", {"msr": True},
                               "SpdfqOptions.msr=True, crops_per_step=1 (default: one crop per image and step)"))
            out.append(Variant("spdfq-msr-all", "spdfq", {"msr": True, "crops_per_step": 0},
                               "SpdfqOptions.crops_per_step=0: all m ~ U{1..4} crops of each image every step"))
        else:
            out.append(Variant(name, name))
    return out


# --- timing helpers (StepTimer, drop_warmup, time_baseline: dfq_deploy.bench.synth_cost) ------------------
def time_method(model: nn.Module, dcfg: dict[str, Any], v: Variant, n: int, iters: int, seed: int) -> dict[str, Any]:
    """Run ``v`` for ``iters`` iterations through :func:`synthesize`; per-iteration seconds grouped by stage."""
    # one pass of all n images, as the baseline's forward+backward (the loop's default pass is smaller)
    opts = method_options(v.method, {"batch_size": 0, **v.options}, num_samples=n, seed=seed, iterations=iters)
    with StepTimer() as timer:
        res = synthesize(model, dcfg, v.method, opts, progress=False)
    stages = [rec["stage"] for rec in res.history]
    if len(timer.times) != iters - 1:
        raise RuntimeError(f"{v.key}: {len(timer.times)} optimizer steps timed for {iters} iterations")
    by_stage: dict[str, list[float]] = {}
    for j, seconds in enumerate(timer.times):
        by_stage.setdefault(stages[j + 1], []).append(seconds)
    return {"stages": by_stage, "loop_seconds": res.seconds, "iterations": iters}


def default_stage_shares(model: nn.Module, dcfg: dict[str, Any], v: Variant, n: int) -> dict[str, Any]:
    """The method's default iteration count and each stage's share of it (for the weighted s/iteration)."""
    cls = get_method(v.method)
    opts = method_options(v.method, v.options, num_samples=n)
    with synthesis_mode(model):
        stages: list[Stage] = cls(model, dcfg, opts).stages()
    total = opts.iterations
    return {"iterations": total, "shares": {s.name: (s.end - s.start) / total for s in stages}}


def weighted_seconds(by_stage: dict[str, list[float]], shares: dict[str, float], warmup: int) -> float:
    """Per-stage medians (warm-up dropped) weighted by the default schedule's stage shares."""
    medians = {s: statistics.median(drop_warmup(t, warmup)) for s, t in by_stage.items() if t}
    missing = [s for s in shares if s not in medians]
    if missing:
        fallback = statistics.median(t for ts in by_stage.values() for t in drop_warmup(ts, warmup))
        logger.warning("stages %s were not reached in the timed run: using the overall median", missing)
        medians.update({s: fallback for s in missing})
    return sum(shares[s] * medians[s] for s in shares)


def measure_synthesis(
    model: nn.Module, dcfg: dict[str, Any], vs: list[Variant], args: argparse.Namespace
) -> dict[str, Any]:
    """Interleaved baseline/method timing of every variant (section 1)."""
    n, iters, warmup = args.num_samples, args.iters, args.warmup
    shares = {v.key: default_stage_shares(model, dcfg, v, n) for v in vs}
    logger.info("warm-up round")
    time_baseline(model, dcfg, n, warmup + 1, args.seed)
    for v in vs:
        time_method(model, dcfg, v, n, max(2, warmup + 1), args.seed)
    raw: dict[str, list[dict[str, Any]]] = {v.key: [] for v in vs}
    for r in range(args.repeats):
        for v in vs:
            base = time_baseline(model, dcfg, n, iters, args.seed + r)
            meth = time_method(model, dcfg, v, n, iters, args.seed + r)
            base_s = statistics.median(drop_warmup(base, warmup))
            meth_s = weighted_seconds(meth["stages"], shares[v.key]["shares"], warmup)
            raw[v.key].append({"repeat": r, "baseline_times_s": base, "method_times_s": meth["stages"],
                               "method_loop_seconds": meth["loop_seconds"], "baseline_s_per_it": base_s,
                               "method_s_per_it": meth_s, "ratio": meth_s / base_s})
            logger.info("repeat %d %-14s baseline %.4f s/it  method %.4f s/it  ratio %.2f", r, v.key, base_s,
                        meth_s, meth_s / base_s)
    out: dict[str, Any] = {}
    for v in vs:
        reps = raw[v.key]
        s_per_it = statistics.median(x["method_s_per_it"] for x in reps)
        base_s = statistics.median(x["baseline_s_per_it"] for x in reps)
        stage_medians = {}
        for stage in shares[v.key]["shares"]:
            kept = [t for x in reps for t in drop_warmup(x["method_times_s"].get(stage, []), warmup)]
            stage_medians[stage] = statistics.median(kept) if kept else None
        ratio = statistics.median(x["ratio"] for x in reps)
        target = TARGET_RATIO.get(v.key)
        default_iters = shares[v.key]["iterations"]
        out[v.key] = {
            "method": v.method, "options": v.options, "note": v.note,
            "s_per_it": s_per_it, "baseline_s_per_it": base_s, "ratio": ratio,
            "ratio_per_repeat": [x["ratio"] for x in reps],
            "images_x_iters_per_s": n / s_per_it, "baseline_images_x_iters_per_s": n / base_s,
            "stage_s_per_it": stage_medians, "default_stage_shares": shares[v.key]["shares"],
            "default_iterations": default_iters, "synthesis_s_at_default_iterations": s_per_it * default_iters,
            "target_ratio": target, "meets_target": None if target is None else ratio <= target,
            "raw": reps,
        }
    return out


# --- memory (section 2) -----------------------------------------------------------------------------------
def rss_kb() -> int:
    """Current resident set size of this process in KiB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_spec(args: argparse.Namespace) -> ModelSpec:
    random = args.memory_model != BUNDLED_MODEL  # nothing can be downloaded: random weights except the bundled
    return ModelSpec(args.memory_model, kwargs=parse_model_kwargs(args.memory_model_kwargs), random_weights=random)


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build the memory model, run one variant for a few iterations, report RSS."""
    key = args.memory_worker
    model = create_model(memory_spec(args))
    dcfg = data_config(model)
    rss_model = rss_kb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if key == "baseline":
        time_baseline(model, dcfg, args.memory_num_samples, args.memory_iters, args.seed)
    else:
        v = next(v for v in variants() if v.key == key)
        opts = method_options(v.method, {"batch_size": 0, **v.options}, num_samples=args.memory_num_samples,
                              seed=args.seed, iterations=args.memory_iters)  # one pass, as the baseline
        synthesize(model, dcfg, v.method, opts, progress=False)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": key, "rss_after_model_mb": rss_model / KB, "peak_rss_before_synthesis_mb": peak_before / KB,
            "peak_rss_mb": peak / KB, "peak_minus_model_mb": (peak - rss_model) / KB, "seconds": seconds,
            "iterations": args.memory_iters, "input_size": list(dcfg["input_size"])}


def measure_memory(vs: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_worker` for the baseline and every variant, each in its own subprocess."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = {}
    for key in ["baseline", *(v.key for v in vs)]:
        cmd = [sys.executable, str(SCRIPT), "--memory-worker", key, "--memory-model", args.memory_model,
               "--memory-num-samples", str(args.memory_num_samples), "--memory-iters", str(args.memory_iters),
               "--seed", str(args.seed)]
        if args.memory_model_kwargs:
            cmd += ["--memory-model-kwargs", args.memory_model_kwargs]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        logger.info("memory: %s", shlex.join(cmd))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.memory_timeout, check=False)
        if proc.returncode != 0:
            logger.error("memory worker %s failed (%d): %s", key, proc.returncode, proc.stderr[-2000:])
            results[key] = {"variant": key, "error": proc.stderr.strip().splitlines()[-1:] or [f"rc {proc.returncode}"]}
            continue
        results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        logger.info("memory %-14s peak %.0f MB (+%.0f MB over the model)", key, results[key]["peak_rss_mb"],
                    results[key]["peak_minus_model_mb"])
    spec = memory_spec(args)
    return {"model": spec.to_dict(), "num_samples": args.memory_num_samples, "iterations": args.memory_iters,
            "how": "fresh subprocess per variant; peak = ru_maxrss; baseline = plain forward+backward",
            "variants": results}


# --- corrections (section 3) ------------------------------------------------------------------------------
def measure_corrections(
    model: nn.Module, dcfg: dict[str, Any], calib: torch.Tensor, synth: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Time ``quantize_`` for every preset x correction mode (+ reconstruction) vs synthesis time."""
    held = held_back_noise(calib, args.seed)
    runs = []
    configs = [(p, mode, False) for p in CORRECTION_PRESETS for mode in MODES]
    configs += [(p, RECONSTRUCT_CORRECT, True) for p in CORRECTION_PRESETS]
    for pname, mode, rec in configs:
        m = copy.deepcopy(model)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        rep = quantize_(m, preset(pname), calib, CorrectionConfig(mode=mode, reconstruct=rec,
                        reconstruct_iters=args.reconstruct_iters), held=held, seed=args.seed, timings=timings)
        total = time.perf_counter() - t
        stages = dict(rep.get("timings", {}))
        fit_s = stages.get("fit_s", 0.0) + stages.get("fold_s", 0.0)
        row: dict[str, Any] = {
            "preset": pname, "correct": mode, "reconstruct": rec, "total_s": total,
            "quantize_s": timings.get("quantize_s"), "fit_s": fit_s, "correction_s": timings.get("correction_s"),
            "reconstruct_s": stages.get("reconstruct_s"), "stage_timings": stages,
        }
        if rec:
            row["reconstruct_iters"] = rep["reconstruction"]["iters"]
        row["fit_over_synthesis"] = {k: fit_s / s["synthesis_s_at_default_iterations"] for k, s in synth.items()}
        if rec:
            row["reconstruct_over_synthesis"] = {
                k: row["reconstruct_s"] / s["synthesis_s_at_default_iterations"] for k, s in synth.items()}
        runs.append(row)
        logger.info("%s correct=%s reconstruct=%s: fit %.2f s, total %.2f s", pname, mode, rec, fit_s, total)
    return {
        "num_samples": len(calib), "held_back": len(held),
        "calibration_images": f"psaq output after {args.iters} iterations (fitting cost does not depend on content)",
        "fit_s_is": "fit_corrections_ + fold_corrections_ (stage_timings fit_s + fold_s); correction_s also "
                    "includes the per-block error reports (errors_*_s) the pipeline computes",
        "synthesis_s_is": "measured s/iteration (section 'synthesis') x the method's default iteration count",
        "target_fit_over_synthesis": TARGET_FIT_SHARE,
        "reconstruct_iters": args.reconstruct_iters, "runs": runs,
    }


# --- the report ---------------------------------------------------------------------------------------------
@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the synthesis loop's per-run INFO lines out of the benchmark log."""
    lib = logging.getLogger("dfq_deploy")
    level = lib.level
    lib.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lib.setLevel(level)


def tables(result: dict[str, Any]) -> str:
    """The human-readable summary of a result dict."""
    n = result["num_samples"]
    lines = [f"Synthesis cost, {result['model']['name']}, {n} images, {result['threads']} thread(s), "
             f"median of {result['repeats']} repeat(s) x {result['iters']} iterations:",
             f"{'method':15s} {'s/it':>8s} {'base s/it':>9s} {'ratio':>6s} {'target':>7s} {'img*it/s':>9s} "
             f"{'default its':>11s} {'synth s':>9s}"]
    for key, s in result["synthesis"].items():
        target = f"<={s['target_ratio']}" if s["target_ratio"] else "-"
        mark = "" if s["meets_target"] is None else (" ok" if s["meets_target"] else " MISS")
        lines.append(f"{key:15s} {s['s_per_it']:8.4f} {s['baseline_s_per_it']:9.4f} {s['ratio']:6.2f} {target:>7s} "
                     f"{s['images_x_iters_per_s']:9.1f} {s['default_iterations']:11d} "
                     f"{s['synthesis_s_at_default_iterations']:9.1f}{mark}")
        if len(s["stage_s_per_it"]) > 1:
            parts = ", ".join(f"{k} {v:.4f} s/it ({100 * s['default_stage_shares'][k]:.0f}%)"
                              for k, v in s["stage_s_per_it"].items() if v is not None)
            lines.append(f"{'':15s} stages: {parts}")
    mem = result.get("memory")
    if mem:
        what = " ".join(str(x) for x in (mem["model"]["name"], mem["model"]["kwargs"] or "", "random weights"
                                          if mem["model"]["random_weights"] else "") if x)
        lines += ["", f"Peak memory, {what}, {mem['num_samples']} images, "
                  f"{mem['iterations']} iterations, fresh process each:",
                  f"{'variant':15s} {'peak RSS MB':>11s} {'after model MB':>14s} {'peak - model MB':>15s}"]
        for key, m in mem["variants"].items():
            if "error" in m:
                lines.append(f"{key:15s} failed: {m['error']}")
            else:
                lines.append(f"{key:15s} {m['peak_rss_mb']:11.0f} {m['rss_after_model_mb']:14.0f} "
                             f"{m['peak_minus_model_mb']:15.0f}")
    corr = result["corrections"]
    keys = list(result["synthesis"])
    lines += ["", f"Correction fitting vs synthesis time (s/it x default iterations), {corr['num_samples']} images; "
              f"target fit/synth <= {100 * TARGET_FIT_SHARE:.0f}%:",
              f"{'preset':6s} {'correct':7s} {'recon':5s} {'quant s':>7s} {'fit s':>7s} {'recon s':>8s} "
              + " ".join(f"{k[:14]:>14s}" for k in keys)]
    for r in corr["runs"]:
        rec_s = f"{r['reconstruct_s']:8.2f}" if r["reconstruct_s"] is not None else f"{'-':>8s}"
        shares = r.get("reconstruct_over_synthesis") if r["reconstruct"] else None
        cells = []
        for k in keys:
            cell = f"{100 * r['fit_over_synthesis'][k]:.2f}%"
            if shares:
                cell += f"/{100 * shares[k]:.0f}%"
            cells.append(f"{cell:>14s}")
        lines.append(f"{r['preset']:6s} {r['correct']:7s} {'yes' if r['reconstruct'] else 'no':5s} "
                     f"{r['quantize_s']:7.2f} {r['fit_s']:7.2f} {rec_s} " + " ".join(cells))
    lines.append("(per-method cells: fit / synthesis; with reconstruction: fit / synthesis and reconstruction / "
                 "synthesis)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL, help="timm name or alias (default: the bundled model)")
    p.add_argument("--checkpoint", help="local weights for --model")
    p.add_argument("--model-kwargs", help="architecture overrides, e.g. img_size=32,patch_size=4,depth=1")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--num-samples", type=int, default=32, help="images per synthesis batch / calibration set")
    p.add_argument("--repeats", type=int, default=3, help="interleaved baseline/method repeats")
    p.add_argument("--iters", type=int, default=10, help="synthesis iterations per timed run")
    p.add_argument("--warmup", type=int, default=2, help="leading iterations dropped per run and per stage")
    p.add_argument("--methods", default="all", help="comma list of variant keys (psaq, spdfq-msr-off, ...)")
    p.add_argument("--reconstruct-iters", type=int, default=100, help="Adam steps per block for reconstruction")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-model", default="deit_t", help="model of the memory runs (random weights)")
    p.add_argument("--memory-model-kwargs", help="architecture overrides for --memory-model")
    p.add_argument("--memory-num-samples", type=int, default=32)
    p.add_argument("--memory-iters", type=int, default=3)
    p.add_argument("--memory-timeout", type=float, default=1200.0, help="seconds per memory subprocess")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. other jobs on the machine)")
    p.add_argument("--output", default=str(ROOT / "results"),
                   help="output folder (writes cost-<model>.json) or a .json file path")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_samples", "repeats", "iters", "reconstruct_iters", "memory_num_samples", "memory_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.iters < 3:
        p.error("--iters must be >= 3 (the first iteration is not timed)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        with quiet_libraries():
            out = memory_worker(args)
        sys.stdout.write(json.dumps(out) + "\n")
        return out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = shlex.join(["python", "experiments/cost.py", *(sys.argv[1:] if argv is None else argv)])
    vs = variants()
    if args.methods != "all":
        wanted = args.methods.split(",")
        unknown = set(wanted) - {v.key for v in vs}
        if unknown:
            raise SystemExit(f"unknown --methods {sorted(unknown)}: choose from {[v.key for v in vs]}")
        vs = [v for v in vs if v.key in wanted]
    spec = ModelSpec(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs), args.random_weights)
    torch.manual_seed(args.seed)
    model = create_model(spec)
    dcfg = data_config(model)
    started = time.perf_counter()
    with quiet_libraries():
        synth = measure_synthesis(model, dcfg, vs, args)
        calib_opts = method_options("psaq", num_samples=args.num_samples, seed=args.seed, iterations=args.iters)
        calib = synthesize(model, dcfg, "psaq", calib_opts, progress=False).images
        corrections = measure_corrections(model, dcfg, calib, synth, args)
    memory = None if args.skip_memory else measure_memory(vs, args)
    result = {
        "command": command,
        "note": args.note,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model() or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "model": spec.to_dict(),
        "input_size": list(dcfg["input_size"]),
        "num_samples": args.num_samples,
        "repeats": args.repeats,
        "iters": args.iters,
        "warmup": args.warmup,
        "baseline": "one forward + cross-entropy on random targets + backward to the input images, same model, "
                    "same images and size, synthesis mode (eval, unfused attention, frozen weights), no optimizer "
                    "step",
        "timing": "method iteration = wall time between consecutive optimizer steps of synthesize() (global "
                  "torch.optim step post-hook); ratio = method / adjacent baseline block, median over repeats",
        "synthesis": synth,
        "corrections": corrections,
        "memory": memory,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.output)
    path = out if out.suffix == ".json" else out / f"cost-{spec.name}.json"
    atomic_write_json(path, result)
    print(tables(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
