"""Size and ONNX Runtime CPU speed of the exported graphs: FP32 vs W8A8 vs W4A16 (and W3A16 for size).

Every graph is FP32-typed (``--dtype fp32``, the export for CPU runtimes): ONNX Runtime on a CPU fuses FP32 Q/DQ
graphs into integer kernels, FP16 ones only in part (``experiments/results/ort-cpu-dtype-*``).

For each model, exports every preset with ``dfq-deploy``'s pipeline (noise calibration, 32 images), records
the ONNX file sizes and their ratio to FP32, then times the graphs in ONNX Runtime (optimizations on, which is
what a user deploys) **interleaved** in one process (A B C A B C ...) at batch 1 and 32, and records which
kernels ORT fused the QDQ graph into (op histogram of ORT's optimized graph).

Usage (the committed results were made with):
    python experiments/export_bench.py --models deit_tiny_cifar10 deit_t --threads 2 --iters 60
Writes ``experiments/results/export-<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dfq_deploy.bench.latency import run_benchmark
from dfq_deploy.config import CalibrationConfig, preset
from dfq_deploy.models import BUNDLED_MODEL, ModelSpec
from dfq_deploy.pipeline import ExportOptions, export_model
from dfq_deploy.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent
SPEED_PRESETS = ["FP32", "W8A8", "W4A16"]
SIZE_PRESETS = ["FP32", "W8A8", "W4A16", "W3A16"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[BUNDLED_MODEL, "deit_t"])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=str(ROOT / "artifacts"), help="where the exported graphs go (not committed)")
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()  # the committed results predate --dtype: FP32 graphs, as this script now exports
    logging.basicConfig(level=logging.WARNING)
    for name in args.models:
        random = name != BUNDLED_MODEL  # no pretrained ImageNet weights offline: speed and size only
        result: dict = {"command": "python " + " ".join(sys.argv), "model": name, "random_weights": random,
                        "exports": {}, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        paths = {}
        for pname in SIZE_PRESETS:
            out = Path(args.workdir) / f"{name}-{pname}"
            t = time.perf_counter()
            rep = export_model(ExportOptions(model=ModelSpec(name, random_weights=random), quant=preset(pname),
                                             bits=32 if pname == "FP32" else 8, dtype="fp32", output=out,
                                             calibration=CalibrationConfig(source="noise"),
                                             parity_threshold=0.0 if random else 0.99, progress=False))
            paths[pname] = Path(rep["artifact"])
            result["exports"][pname] = {
                "size_bytes": rep["size_bytes"], "export_seconds": time.perf_counter() - t,
                "parity_held_back": rep["parity"]["held_back"],
            }
        fp = result["exports"]["FP32"]["size_bytes"]
        for e in result["exports"].values():
            e["size_ratio_vs_fp32"] = e["size_bytes"] / fp
        bench = run_benchmark([paths[n] for n in SPEED_PRESETS], batches=[int(b) for b in args.batches.split(",")],
                              warmup=args.warmup, iters=args.iters, threads=args.threads, progress=True)
        result["latency"] = {
            a["name"]: {
                "kernels": a.get("info", {}).get("kernels"),
                "batches": [{k: v for k, v in b.items() if k != "samples_s"} for b in a["batches"]],
            }
            for a in bench["artifacts"]
        }
        result["latency_config"] = bench.get("config")
        out = Path(args.results) / f"export-{name}.json"
        atomic_write_json(out, result)
        print(f"\n{name} ({'random weights' if random else 'trained'}): {out}")
        for pname, e in result["exports"].items():
            print(f"  {pname:6s} {e['size_bytes'] / 1e6:7.2f} MB  x{e['size_ratio_vs_fp32']:.3f} of FP32")
        for a in bench["artifacts"]:
            for b in a["batches"]:
                if "latency" in b:
                    vs = b.get("vs_baseline") or {}
                    print(f"  {a['name']:28s} batch {b['batch']:3d}: p50 {b['latency']['p50_ms']:8.2f} ms  "
                          f"speedup vs FP32 {vs.get('speedup_p50') or 1.0:.2f}x")
        print(json.dumps({a["name"]: a.get("info", {}).get("kernels") for a in bench["artifacts"]}, indent=1))


if __name__ == "__main__":
    main()
