"""Accuracy grid: every calibration source x every preset x several seeds, on the artifact that ships.

Deployable presets (W8A8, W4A16, W3A16, W2A16) are exported to QDQ ONNX and evaluated in ONNX Runtime (CPU,
optimizations on, INT4 MatMulNBits at accuracy level 0 so activations stay float). Research presets (W3A3,
W4A3, W4A4, W5A5, W6A6: every matmul input quantized, MSE ranges; ``--log2`` adds log2 softmax variants) have
no deployable kernel: they are evaluated on the PyTorch fake-quant model and labelled "simulated" everywhere.
FP32 is the float PyTorch model exported to ONNX and run in ONNX Runtime.

Calibration sets are made once per (source, seed) and shared by every preset; the wall time of synthesis,
calibration and export is recorded per cell.

Usage:
    python bench/accuracy.py                       # full grid on the bundled model, 3 seeds, all of dev
    python bench/accuracy.py --quick               # one seed, 500 images, short synthesis (< 10 min)
    python bench/accuracy.py --smoke --model deit_t --model-kwargs img_size=32,patch_size=4,depth=1,num_classes=10 \
        --random-weights                           # two cells, a few images: the harness test
Writes ``bench/results/accuracy-<model>[-quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfq_deploy.calib.synth import SYNTHESIZERS, CalibRequest
from dfq_deploy.config import preset
from dfq_deploy.data import default_cifar10, load_images
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import run_session, run_torch
from dfq_deploy.models import BUNDLED_MODEL, ModelSpec, create_model, data_config, parse_model_kwargs
from dfq_deploy.pipeline import quantize_and_correct
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger("bench.accuracy")
ROOT = Path(__file__).resolve().parent
DEPLOYABLE = ["W8A8", "W4A16", "W3A16", "W2A16"]
SIMULATED = ["W6A6", "W5A5", "W4A4", "W4A3", "W3A3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--checkpoint")
    p.add_argument("--model-kwargs")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--data", default=str(default_cifar10("dev")), help="evaluation ImageFolder")
    p.add_argument("--calib-dir", default=str(default_cifar10("calib-real")), help="ImageFolder for 'real'")
    p.add_argument("--sources", default="all", help="comma list of calibration sources (default: all registered)")
    p.add_argument("--presets", default=",".join(DEPLOYABLE + SIMULATED))
    p.add_argument("--log2", action="store_true", help="also simulate log2 softmax quantizers (W4A4-log2, ...)")
    p.add_argument("--correct", default="diag", choices=["none", "bias", "diag", "full"],
                   help="closed-form correction, as in dfq-deploy export (default diag)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of this many images")
    p.add_argument("--synth-iters", type=int, default=None, help="override synthesis iterations")
    p.add_argument("--quick", action="store_true", help="one seed, 500 images, short synthesis")
    p.add_argument("--smoke", action="store_true", help="two cells, a few images (harness test)")
    p.add_argument("--output", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.limit = 1, args.limit or 500
        args.synth_iters = args.synth_iters or 200
    if args.smoke:
        args.seeds, args.limit, args.synth_iters = 1, args.limit or 8, args.synth_iters or 2
        args.num_samples = min(args.num_samples, 4)
        if args.sources == "all":
            args.sources = "noise"
        if args.presets == ",".join(DEPLOYABLE + SIMULATED):
            args.presets = "W4A16,W4A4"
    return args


def ort_logits(proto, images: torch.Tensor) -> np.ndarray:
    """Logits of the exported graph in ONNX Runtime, optimizations on (the deployed configuration)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return run_session(sess, images, batch_size=250)


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    spec = ModelSpec(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs), args.random_weights)
    base = create_model(spec)
    dcfg = data_config(base)
    x_eval, y_eval = load_images(args.data, dcfg, limit=args.limit, seed=0)
    y_eval = y_eval.numpy()
    sources = SYNTHESIZERS.names() if args.sources == "all" else args.sources.split(",")
    presets = args.presets.split(",")
    if args.log2:
        presets += [f"{p}-log2" for p in presets if p in SIMULATED]
    cells: list[dict[str, Any]] = []
    held = SYNTHESIZERS.get("noise")(base, CalibRequest(args.num_samples, 10_000, dcfg)).images  # for error reports

    def acc(logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == y_eval).mean())

    t = time.perf_counter()
    fp_proto = to_onnx(copy.deepcopy(base), tuple(dcfg["input_size"]))
    fp32 = {"preset": "FP32", "source": "-", "seed": 0, "top1": acc(ort_logits(fp_proto, x_eval)),
            "measured_on": "onnxruntime", "times": {"export_s": time.perf_counter() - t}}
    cells.append(fp32)
    logger.warning("FP32 (onnxruntime): %.4f", fp32["top1"])
    for source in sources:
        for seed in range(args.seeds):
            options = {"iters": args.synth_iters} if args.synth_iters and source not in ("noise", "real") else {}
            t = time.perf_counter()
            calib = SYNTHESIZERS.get(source)(base, CalibRequest(args.num_samples, seed, dcfg, args.calib_dir, options))
            synth_s = time.perf_counter() - t
            for pname in presets:
                cfg = preset(pname.removesuffix("-log2"))
                if pname.endswith("-log2"):
                    cfg = cfg.with_(attn_log2=True, name=pname)
                model = copy.deepcopy(base)
                t = time.perf_counter()
                stages: dict[str, float] = {}
                corr = quantize_and_correct(model, cfg, calib.images, held, correct=args.correct, seed=seed,
                                            timings=stages)
                calib_s = time.perf_counter() - t
                cell = {"preset": pname, "source": source, "seed": seed, "correct": corr.get("mode"),
                        "times": {"synthesis_s": synth_s, "calibration_s": calib_s, **stages}}
                if cfg.deployable:
                    t = time.perf_counter()
                    proto = to_onnx(model, tuple(dcfg["input_size"]))
                    cell["times"]["export_s"] = time.perf_counter() - t
                    cell["top1"], cell["measured_on"] = acc(ort_logits(proto, x_eval)), "onnxruntime"
                else:
                    logits = run_torch(model, x_eval, batch_size=250)
                    cell["top1"], cell["measured_on"] = acc(logits), "simulated (pytorch)"
                cells.append(cell)
                logger.warning("%-10s %-7s seed %d: %.4f (%s)", pname, source, seed, cell["top1"],
                               cell["measured_on"])
    return {
        "command": "python " + " ".join(sys.argv),
        "model": spec.to_dict(), "data": args.data, "n_eval": len(y_eval), "calib_dir": args.calib_dir,
        "num_samples": args.num_samples, "seeds": args.seeds, "correct": args.correct, "synth_iters": args.synth_iters,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": cells, "summary": summarize(cells),
    }


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (sample std) of top-1 per (preset, source)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["preset"], c["source"]), []).append(c)
    rows = []
    for (pname, source), cs in groups.items():
        accs = [c["top1"] for c in cs]
        rows.append({"preset": pname, "source": source, "n_seeds": len(accs), "top1_mean": statistics.fmean(accs),
                     "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "measured_on": cs[0]["measured_on"],
                     "mean_times": {k: statistics.fmean(c["times"].get(k, 0.0) for c in cs)
                                    for k in cs[0]["times"]}})
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows = result["summary"]
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["preset"] != "FP32"))
    sources = list(dict.fromkeys(r["source"] for r in rows if r["source"] != "-"))
    fp = next(r for r in rows if r["preset"] == "FP32")
    by = {(r["preset"], r["source"]): r for r in rows}
    sim = {r["preset"] for r in rows if r["measured_on"].startswith("simulated")}
    lines = [
        f"Top-1 (%) of `{result['model']['name']}` on {result['n_eval']} images of `{result['data']}`, "
        f"mean ± std over {result['seeds']} seed(s), {result['num_samples']} calibration images, "
        f"correction `{result['correct']}`. "
        f"FP32 (ONNX Runtime): {100 * fp['top1_mean']:.2f}. Columns marked * are simulated in PyTorch "
        "(no deployable kernel); the others are measured on the exported ONNX in ONNX Runtime.",
        "",
        "| source | " + " | ".join(p + ("*" if p in sim else "") for p in presets) + " |",
        "| --- |" + " --- |" * len(presets),
    ]
    for s in sources:
        cells = []
        for p in presets:
            r = by.get((p, s))
            cells.append(f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}" if r else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("deployable", "simulated"), strict=True):
        presets = [p for p in (DEPLOYABLE if kind == "deployable" else SIMULATED)
                   if any(r["preset"] == p for r in rows)]
        for s in dict.fromkeys(r["source"] for r in rows if r["source"] != "-"):
            pts = [(p, r) for p in presets for r in rows if r["preset"] == p and r["source"] == s]
            if pts:
                ax.errorbar([p for p, _ in pts], [100 * r["top1_mean"] for _, r in pts],
                            yerr=[100 * r["top1_std"] for _, r in pts], marker="o", capsize=3, label=s)
        fp = next(r for r in rows if r["preset"] == "FP32")
        ax.axhline(100 * fp["top1_mean"], color="k", ls="--", lw=1, label="FP32")
        ax.set_title(f"{kind} ({'ONNX Runtime' if kind == 'deployable' else 'PyTorch fake-quant'})")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']['name']}: accuracy by bit width and calibration source")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_grid(args)
    suffix = "-smoke" if args.smoke else "-quick" if args.quick else ""
    stem = Path(args.output) / f"accuracy-{result['model']['name']}{suffix}"
    atomic_write_json(stem.with_suffix(".json"), result)
    md = markdown(result)
    atomic_write_text(stem.with_suffix(".md"), md)
    plot(result, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json/.md/.png")
    return result


if __name__ == "__main__":
    main()
