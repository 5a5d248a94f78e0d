"""FP16 vs FP32 graphs: the default exports, linted, parity-checked and measured in ONNX Runtime on ``dev``.

For each model, one calibration set is synthesized with the export's default method and settings and saved
once; every preset is then exported by ``dfq-deploy``'s own export job (:func:`dfq_deploy.pipeline.export_model`,
the code a user runs) twice from that set, with ``--dtype fp16`` (the default, what TensorRT builds) and
``--dtype fp32``, so the two graphs differ only in their compute type. Each export runs the linter and the
parity check on its own graph and ONNX Runtime's top-1 on ``dev`` is measured on the written file. The table
gives the difference in points and whether the FP16 graph is within :data:`TOLERANCE_POINTS` of the FP32 one,
how often the two graphs' top-1 predictions agree and how far their logits are apart (relative to the logit
scale). The tiny Swin has random weights (no trained Swin is bundled): its top-1 is at chance, so its logit
figures are the informative ones.

Usage (the committed results were made with):
    python experiments/dtype.py --threads 2
Writes ``experiments/results/dtype.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfq_deploy.config import DEFAULT_CALIB, DEFAULT_SYNTH_ITERS, GRAPH_DTYPES, CalibrationConfig
from dfq_deploy.data import default_cifar10, load_images
from dfq_deploy.export.evaluate import onnx_data_config
from dfq_deploy.export.ort import FLOAT_ACTIVATIONS, ort_session
from dfq_deploy.export.parity import parity_sets, run_session
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.pipeline import ExportOptions, export_model
from dfq_deploy.synth import synthesize_default
from dfq_deploy.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent
PRESETS = {8: "W8A8", 4: "W4A16"}
#: The FP16 graph's top-1 may differ from the FP32 graph's by at most this many points.
TOLERANCE_POINTS = 0.2
MODELS = {
    "bundled": ModelSpec(),
    "tiny_swin": ModelSpec(TINY_CONFIGS["swin"][0], kwargs=dict(TINY_CONFIGS["swin"][1]), random_weights=True),
}


def logits(onnx_path: Path, images: torch.Tensor, threads: int | None) -> np.ndarray:
    """ONNX Runtime's logits of ``images`` (optimizations on, as deployed; float activations as in
    ``experiments/accuracy.py``)."""
    session = ort_session(str(onnx_path), threads=threads, config=FLOAT_ACTIVATIONS)
    return run_session(session, images, batch_size=250).astype(np.float64)


def run_model(key: str, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir) / key
    t = time.perf_counter()
    synth_dir = synthesize_default(spec, work / "synth", args.num_samples, args.synth_iters, progress=False)
    synth_s = time.perf_counter() - t
    model = create_model(spec)  # for its data config only
    x, y = load_images(args.data, data_config(model), limit=args.limit, seed=0)
    y = y.numpy()
    rows = []
    for bits, pname in PRESETS.items():
        outs: dict[str, np.ndarray] = {}
        row: dict[str, Any] = {"preset": pname}
        for dtype in GRAPH_DTYPES:
            torch.manual_seed(0)
            report = export_model(ExportOptions(model=spec, bits=bits, dtype=dtype, output=work / f"{pname}-{dtype}",
                                                calibration=CalibrationConfig(calib_from=str(synth_dir)),
                                                progress=False))
            path = Path(report["artifact"])
            assert onnx_data_config(path)["input_size"] == tuple(data_config(model)["input_size"])
            outs[dtype] = logits(path, x, args.threads)
            sets = parity_sets(report["parity"]).values()
            row[dtype] = {
                "top1": float((outs[dtype].argmax(-1) == y).mean()), "size_bytes": report["size_bytes"],
                "lint": report["lint"], "parity_passed": report["parity"]["passed"],
                "parity_inputs": sum(v["n"] for v in sets),
                "parity_disagreeing": sum(v["disagreeing"] for v in sets),
                "parity_tolerance": report["parity"]["tolerance"],
                "parity_median_error": report["parity"]["median_error"],
                "export_s": sum(report["timings"].values()),  # the whole export job, every stage
            }
            logging.warning("%s %s %s: top-1 %.4f, parity %s", key, pname, dtype, row[dtype]["top1"],
                            row[dtype]["parity_passed"])
        row["delta_points"] = 100 * (row["fp16"]["top1"] - row["fp32"]["top1"])
        row["within_tolerance"] = abs(row["delta_points"]) <= TOLERANCE_POINTS
        row["prediction_agreement"] = float((outs["fp16"].argmax(-1) == outs["fp32"].argmax(-1)).mean())
        # relative to the logit scale (median std across classes), as in the parity check
        err = np.abs(outs["fp16"] - outs["fp32"]).max(-1) / np.median(outs["fp32"].std(-1))
        row["logit_error_fp16_vs_fp32"] = {"median": float(np.median(err)), "max": float(err.max())}
        rows.append(row)
    return {"model": spec.to_dict(), "n_eval": int(len(y)), "synthesis_s": synth_s, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--data", default=str(default_cifar10("dev")), help="evaluation ImageFolder")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of this many images")
    p.add_argument("--num-samples", type=int, default=ExportOptions.num_samples)
    p.add_argument("--synth-iters", type=int, default=DEFAULT_SYNTH_ITERS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=str(ROOT / "artifacts" / "dtype"), help="exports (not committed)")
    p.add_argument("--output", default=str(ROOT / "results" / "dtype.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": "python " + " ".join(["experiments/dtype.py", *(argv if argv is not None else sys.argv[1:])]),
              "calibration": {"source": DEFAULT_CALIB, "num_samples": args.num_samples,
                              "synth_iters": args.synth_iters},
              "tolerance_points": TOLERANCE_POINTS, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "models": {k: run_model(k, MODELS[k], args) for k in args.models}}
    atomic_write_json(Path(args.output), result)
    print(f"{'model':10} {'preset':6} {'fp32':>7} {'fp16':>7} {'delta':>7} {'within':>6} {'agree':>6} "
          f"{'logit err':>9}  parity fp16 (disagreeing)")
    for key, res in result["models"].items():
        for r in res["rows"]:
            f16 = r["fp16"]
            print(f"{key:10} {r['preset']:6} {100 * r['fp32']['top1']:7.2f} {100 * f16['top1']:7.2f} "
                  f"{r['delta_points']:+7.2f} {'yes' if r['within_tolerance'] else 'NO':>6} "
                  f"{100 * r['prediction_agreement']:6.2f} "
                  f"{r['logit_error_fp16_vs_fp32']['median']:9.2e}  {f16['parity_passed']} "
                  f"({f16['parity_disagreeing']}/{f16['parity_inputs']})")
    return result


if __name__ == "__main__":
    main()
