"""Synthesis cost per device and model: s/iteration, peak memory, ratio to a plain forward+backward.

One row per model and precision (:func:`dfq_deploy.bench.synth_cost.device_row`: the ``dfqvit`` detail stage,
32 images at 224 px in one pass, random weights), each in a process of its own so that its peak memory is its
own: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS (``ru_maxrss``) on the CPU. The results file is
rewritten (atomically) after every row, so an interrupted run keeps what it measured.

Usage:
    python experiments/synth_devices.py --device cuda     # GPU rows, fp32 and bf16: under 5 minutes on a desktop GPU
    python experiments/synth_devices.py --device cpu --threads 2 --iters 2 --precisions fp32   # the committed CPU rows
Writes ``experiments/results/synth-devices-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
MODELS = ("deit_t", "deit_s", "deit_b", "vit_l", "swin_t")
logger = logging.getLogger("bench.synth_devices")


def row_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process (the parent reads the JSON line it prints)."""
    import torch

    from dfq_deploy.bench.synth_cost import device_row
    from dfq_deploy.device import resolve_device
    from dfq_deploy.models import ModelSpec, create_model, data_config, parse_model_kwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    kwargs = parse_model_kwargs(args.model_kwargs) if args.model_kwargs else {}
    model = create_model(ModelSpec(args.row, kwargs=kwargs, random_weights=True)).to(device)
    row = device_row(model, data_config(model), args.method, args.num_samples, args.iters, args.warmup,
                     args.row_precision, args.seed)
    row["alias"] = args.row
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return row


def table(rows: list[dict[str, Any]]) -> str:
    gib = 2**30
    lines = ["| model | params (M) | precision | images/pass | baseline s/it | dfqvit s/it | ratio | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['alias']} | | {r['precision']} | | | | | {r['error']} |")
            continue
        peak = r["method_peak_bytes"] or r["peak_rss_bytes"]
        kind = "GPU" if r["method_peak_bytes"] else "RSS"
        lines.append(f"| {r['alias']} | {r['params_m']:.1f} | {r['precision']} | {r['images_per_pass']} | "
                     f"{r['baseline_s_per_it']:.3f} | {r['method_s_per_it']:.3f} | {r['ratio']:.2f} | "
                     f"{peak / gib:.2f} GiB {kind} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list (default {','.join(MODELS)})")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    p.add_argument("--method", default="dfqvit")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per row (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="dropped leading iterations per row (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU rows)")
    p.add_argument("--model-kwargs", help="architecture overrides for every model (harness tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    p.add_argument("--note", default="")
    p.add_argument("--output", default=str(ROOT / "results"))
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--row-precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.row:
        print(json.dumps(row_worker(args)))
        return {}

    from dfq_deploy.device import resolve_device
    from dfq_deploy.utils import atomic_write_json, atomic_write_text

    device = resolve_device(args.device)  # one line and exit 2 when CUDA is not there
    out = Path(args.output)
    stem = f"synth-devices-{device.type}"
    result: dict[str, Any] = {
        "command": "python experiments/synth_devices.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "note": args.note, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "rows": [],
    }
    t0 = time.perf_counter()
    base = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--method", args.method,
            "--num-samples", str(args.num_samples), "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else []) + \
        (["--model-kwargs", args.model_kwargs] if args.model_kwargs else [])
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            logger.info("row %s %s on %s", model, precision, device)
            try:
                proc = subprocess.run([*base, "--row", model, "--row-precision", precision], capture_output=True,
                                      text=True, timeout=args.timeout, check=False)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"alias": model, "precision": precision, "error": err[:300]}
                else:
                    row = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                row = {"alias": model, "precision": precision, "error": f"timed out after {args.timeout:.0f} s"}
            logger.info("%s", {k: row.get(k) for k in ("alias", "precision", "ratio", "method_s_per_it", "error")})
            result["rows"].append(row)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            atomic_write_json(out / f"{stem}.json", result)
    md = f"# Synthesis cost on {device.type}\n\n`{result['command']}`\n\n{table(result['rows'])}\n"
    atomic_write_text(out / f"{stem}.md", md)
    print(table(result["rows"]))
    print(f"{result['wall_s']:.0f} s; wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    from dfq_deploy.errors import DfqError

    try:
        main()
    except DfqError as exc:
        print(f"synth_devices: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
