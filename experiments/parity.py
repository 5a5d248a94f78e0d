"""False alarms of the parity check: correct exports that the check must never refuse.

Two groups, every export through ``dfq-deploy``'s own export job (:func:`dfq_deploy.pipeline.export_model`):

1. the case a user met (issue 13): the bundled weights loaded into timm's ``deit_tiny_patch16_224`` with
   ``img_size=32, patch_size=4, depth=6, num_classes=10`` via ``--checkpoint``, default settings (``dfqvit``
   calibration, 200 iterations, 32 images, ``diag`` correction) at ``--bits 8/4/3`` and seeds 0-4; the dfqvit
   images of each seed are synthesised once (the same run ``export`` makes in-process) and passed as
   ``--calib-from`` to the three exports;
2. tiny random-weight models of every family (DeiT with a class token, ViT with ``class_token=False,
   global_pool="avg"``, Swin) at every deployable preset, noise calibration, seeds 0-2.

For each export: passed or not, inputs beyond rounding, the median and largest per-input error, the tolerance
and the rounding null (float16 for the FP16 graphs the export writes by default, float64 for FP32
graphs). Usage (the committed results were made with)::

    python experiments/parity.py --threads 2

Writes ``experiments/results/parity.json`` and prints one line per export.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfq_deploy.config import CalibrationConfig
from dfq_deploy.export.parity import parity_sets
from dfq_deploy.models import BUNDLED_ARCH, BUNDLED_WEIGHTS, TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.pipeline import ExportOptions, export_model
from dfq_deploy.synth import synthesize_to_dir
from dfq_deploy.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent
#: The issue's model: timm DeiT-Tiny with the bundled architecture overrides.
USER_MODEL = "deit_tiny_patch16_224"
USER_KWARGS = {k: BUNDLED_ARCH[k] for k in ("img_size", "patch_size", "depth", "num_classes")}


def _row(group: str, label: str, report: dict, seconds: float) -> dict:
    par = report["parity"]
    sets = parity_sets(par)
    row = {
        "group": group, "export": label, "passed": par["passed"], "tolerance": par["tolerance"], "null": par["null"],
        "inputs": sum(v["n"] for v in sets.values()), "disagreeing": sum(v["disagreeing"] for v in sets.values()),
        "flips": sum(v["flips"] for v in sets.values()),
        "median_error": max(v["median_error"] for v in sets.values()),
        "max_error": max(v["max_error"] for v in sets.values()),
        "structure_problems": par["structure"]["problems"], "seconds": seconds,
    }
    print(f"{group:12s} {label:28s} passed={row['passed']} beyond-rounding {row['disagreeing']}/{row['inputs']} "
          f"flips {row['flips']} median {row['median_error']:.4f} max {row['max_error']:.4f} "
          f"tol {row['tolerance']:.4f} ({seconds:.0f} s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds of the user's case (0..N-1)")
    p.add_argument("--family-seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec(USER_MODEL, checkpoint=str(BUNDLED_WEIGHTS), kwargs=dict(USER_KWARGS))
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = create_model(spec)
            synth = Path(tmp) / f"synth-{seed}"
            synthesize_to_dir(model, data_config(model), "dfqvit", num_samples=32, iters=200, output_dir=synth,
                          seed=seed, progress=False, model_info=spec.to_dict())
            for bits in (8, 4, 3):
                t = time.perf_counter()
                rep = export_model(ExportOptions(model=spec, bits=bits, output=Path(tmp) / f"e{seed}-{bits}",
                                                 calibration=CalibrationConfig(calib_from=str(synth)), seed=seed,
                                                 progress=False))
                rows.append(_row("user_case", f"bits {bits} seed {seed}", rep, time.perf_counter() - t))
        for family, (name, kwargs) in TINY_CONFIGS.items():
            fspec = ModelSpec(name, kwargs=kwargs, random_weights=True)
            for bits in (8, 4, 3, 32):
                for seed in range(args.family_seeds):
                    t = time.perf_counter()
                    rep = export_model(ExportOptions(model=fspec, bits=bits, output=Path(tmp) / f"{family}-{bits}",
                                                     calibration=CalibrationConfig(source="noise"), seed=seed,
                                                     progress=False))
                    rows.append(_row(family, f"bits {bits} seed {seed}", rep, time.perf_counter() - t))
    refused = [r for r in rows if not r["passed"]]
    result = {
        "command": "python " + " ".join(sys.argv), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "exports": len(rows), "refused": len(refused),
        "inputs": sum(r["inputs"] for r in rows), "inputs_beyond_rounding": sum(r["disagreeing"] for r in rows),
        "largest_error_over_tolerance": max(r["max_error"] / r["tolerance"] for r in rows),
        "seconds": time.perf_counter() - t_all, "rows": rows,
    }
    atomic_write_json(Path(args.results) / "parity.json", result)
    print(f"{len(rows)} correct exports, {len(refused)} refused; {result['inputs_beyond_rounding']} of "
          f"{result['inputs']} inputs beyond rounding; largest error / tolerance "
          f"{result['largest_error_over_tolerance']:.2f}")


if __name__ == "__main__":
    main()
