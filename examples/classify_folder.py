"""Classify an ImageFolder with a TensorRT engine built by ``dfq-deploy build``; print top-1 and images/s.

Preprocessing (resize, centre crop, mean/std) comes from the ``report.json`` that ``dfq-deploy export`` wrote
next to the ONNX file, or from flags::

    python examples/classify_folder.py out/deit/model.engine data/val      # uses out/deit/report.json
    python examples/classify_folder.py model.engine data/val --report out/deit/report.json
    python examples/classify_folder.py model.engine data/val --size 224 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    python examples/classify_folder.py out/deit/model.engine data/val --threads 4 --cuda-graphs

With ``--threads N`` the images are decoded on the main thread and N worker threads call the one engine
(:class:`~dfq_deploy.trt.TRTEngine` lends each concurrent call an execution context of its own); this is the
pattern for a server.

Labels follow the ImageFolder convention (class folders sorted alphabetically give 0..C-1), which must be
the model's class order for the top-1 figure to mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.data import iter_image_batches
from dfq_deploy.errors import DfqError
from dfq_deploy.trt import TRTEngine, summarize_timings

DEFAULT_CROP_PCT = 0.875


def _floats(text: str, n: int, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise DfqError(f"{flag} {text!r}: expected {n} comma-separated numbers") from exc
    if len(vals) != n:
        raise DfqError(f"{flag} {text!r}: expected {n} comma-separated numbers")
    return vals


def data_config(engine_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The timm data config: ``report.json``'s ``data_config``, then flags on top."""
    report = Path(args.report) if args.report else engine_path.parent / "report.json"
    cfg: dict[str, Any] = {}
    if report.is_file():
        try:
            cfg = dict(json.loads(report.read_text())["data_config"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DfqError(f"{report} has no readable data_config: pass --size/--mean/--std instead") from exc
    elif args.report:
        raise DfqError(f"report not found: {report}")
    if args.size:
        h, _, w = args.size.partition("x")
        cfg["input_size"] = (3, int(h), int(w or h))
    if args.mean:
        cfg["mean"] = _floats(args.mean, 3, "--mean")
    if args.std:
        cfg["std"] = _floats(args.std, 3, "--std")
    if args.crop_pct is not None:
        cfg["crop_pct"] = args.crop_pct
    if args.interpolation:
        cfg["interpolation"] = args.interpolation
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        raise DfqError(f"no report.json beside {engine_path} and no flags for {missing}: pass --report or "
                       "--size/--mean/--std")
    cfg.setdefault("crop_pct", DEFAULT_CROP_PCT)
    cfg.setdefault("interpolation", "bicubic")
    cfg["input_size"] = tuple(cfg["input_size"])
    return cfg


def classify(args: argparse.Namespace) -> int:
    engine_path = Path(args.engine)
    cfg = data_config(engine_path, args)
    correct = seen = 0
    t_start = time.perf_counter()
    if args.threads < 1:
        raise DfqError(f"--threads {args.threads}: must be at least 1")
    with TRTEngine(engine_path, backend=args.backend, cuda_graphs=args.cuda_graphs) as engine, \
            ThreadPoolExecutor(args.threads) as workers:
        t_loop = time.perf_counter()
        lo, _, hi = engine.batch_range
        chw = engine.inputs[0].profile[0][1:]  # type: ignore[index]
        if tuple(chw) != tuple(cfg["input_size"]):
            raise DfqError(f"the engine takes {list(chw)} images, the data config gives "
                           f"{list(cfg['input_size'])}")
        batch_size = min(args.batch_size, hi)

        def run(images: np.ndarray, labels: np.ndarray) -> int:
            n = len(images)
            if n < lo:  # pad a short last batch up to the profile's minimum
                images = np.concatenate([images, np.zeros((lo - n, *images.shape[1:]), images.dtype)])
            logits = engine.infer(images)[:n]  # one engine, any thread: each call gets its own context
            return int((logits.argmax(-1) == labels).sum())

        # one thread: run here (any backend); more: decode here, run on the workers, 2 batches a worker in flight
        in_flight: deque[Future[int]] = deque()
        for x, y in iter_image_batches(args.data, cfg, batch_size, args.limit):
            seen += len(y)
            if args.threads == 1:
                correct += run(x.numpy(), y.numpy())
                continue
            in_flight.append(workers.submit(run, x.numpy(), y.numpy()))
            while len(in_flight) >= 2 * args.threads:
                correct += in_flight.popleft().result()
        correct += sum(f.result() for f in in_flight)
        loop_s = time.perf_counter() - t_loop
        history = list(engine.timing_history)
        contexts, graph_calls = engine.num_contexts, engine.graph_calls
        # the first call of each context is its warm-up (and, with graphs, the next one its capture)
        warm = contexts * (2 if args.cuda_graphs else 1)
        stats = summarize_timings(history, skip=warm if len(history) > warm else 0)
    total_s = time.perf_counter() - t_start
    if seen == 0:
        raise DfqError(f"no images in {args.data}")
    print(f"{engine_path.name}: top-1 {100 * correct / seen:.2f}% on {seen} images")
    if args.threads == 1:
        engine_rates = (f"{stats['images_per_s_wall']:.1f} images/s engine calls incl. copies, "
                        f"{stats['images_per_s_compute']:.1f} images/s GPU compute")
    else:  # overlapping calls: per-call times include waiting for the shared GPU, so only the loop rate holds
        engine_rates = f"{seen / loop_s:.1f} images/s through {args.threads} threads"
    print(f"throughput: {seen / total_s:.1f} images/s end to end (with JPEG decoding and preprocessing), "
          f"{engine_rates} (batch {batch_size})")
    print(f"per batch: compute {stats['compute_ms']['median']:.2f} ms, "
          f"H2D {stats['h2d_ms']['median']:.2f} ms, D2H {stats['d2h_ms']['median']:.2f} ms (medians); "
          f"{args.threads} thread(s), {contexts} execution context(s), {graph_calls} CUDA graph replays")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", help="engine file from dfq-deploy build")
    p.add_argument("data", help="ImageFolder directory: DATA/<class>/<image>")
    p.add_argument("--report", help="report.json of the export (default: beside the engine)")
    p.add_argument("--size", help="input size H or HxW (overrides the report)")
    p.add_argument("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", help="normalisation std, e.g. 0.229,0.224,0.225")
    p.add_argument("--crop-pct", type=float, help=f"centre-crop fraction (default {DEFAULT_CROP_PCT})")
    p.add_argument("--interpolation", help="resize interpolation (default bicubic)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per engine call (capped at the engine profile's max)")
    p.add_argument("--limit", type=int, help="classify a seeded random subset of this many images")
    p.add_argument("--backend", choices=("cuda-python", "pycuda"), help="CUDA Python bindings to use")
    p.add_argument("--threads", type=int, default=1,
                   help="threads calling the one engine at once (each gets its own execution context)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay a CUDA graph of the engine for batches of a repeated shape (cuda-python)")
    args = p.parse_args(argv)
    try:
        return classify(args)
    except DfqError as exc:
        print(f"classify_folder: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
