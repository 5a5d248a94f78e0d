"""Scaling of data-free synthesis over processes (torch.distributed): images x iterations per second, efficiency.

For each process count N, launches ``python -m torch.distributed.run --standalone --nproc-per-node N`` on this
script's worker, which synthesises with the package (``dfq_deploy.synth.synthesize``, sharded over the ranks:
gloo on the CPU, NCCL on GPUs) on the bundled model, one untimed warm-up run first. The timed figure is rank
0's wall time of the iterations (it waits for the slowest rank at every step's all-gather), so launch and
import times are not counted. Throughput is ``num_samples * iterations / seconds``; the parallel efficiency is
``speedup / N`` against the 1-process row of the same invocation. Each count runs ``--repeats`` times in
turn (1, 2, 1, 2, ...) and the fastest run counts. The runs also report a hash of the images, so the table
shows that every process count made the same images.

Usage:
    python experiments/synth_scaling.py                          # the committed CPU rows (gloo, 1 thread each)
    python experiments/synth_scaling.py --device cuda --procs 1,2,4,8 --num-samples 256 --threads 0   # a GPU node
Writes ``experiments/results/synth-scaling-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("bench.synth_scaling")


def worker(args: argparse.Namespace) -> None:
    """One rank (started by torchrun): a warm-up run, then the timed run; rank 0 prints one JSON line."""
    import torch

    from dfq_deploy.config import BUNDLED_MODEL
    from dfq_deploy.device import resolve_device
    from dfq_deploy.models import ModelSpec, create_model, data_config
    from dfq_deploy.synth import synthesize
    from dfq_deploy.synth.distributed import init_from_env

    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_from_env(resolve_device(args.device))
    torch.manual_seed(0)
    model = create_model(ModelSpec(args.model or BUNDLED_MODEL)).to(device)
    cfg = data_config(model)
    opts = {"num_samples": args.num_samples, "seed": 0, "batch_size": args.batch_size}
    synthesize(model, cfg, args.method, {**opts, "iterations": args.warmup}, progress=False)
    res = synthesize(model, cfg, args.method, {**opts, "iterations": args.iters}, progress=False)
    if res.world_size > 1 and torch.distributed.get_rank() != 0:
        return
    digest = hashlib.blake2b(res.images.contiguous().numpy().tobytes(), digest_size=8).hexdigest()
    print("RESULT " + json.dumps({"processes": res.world_size, "backend": res.backend, "seconds": res.seconds,
                                  "threads_per_process": torch.get_num_threads(), "device": res.device,
                                  "images_hash": digest}), flush=True)


def launch(args: argparse.Namespace, procs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           str(Path(__file__).resolve()), "--worker", "--device", args.device, "--method", args.method,
           "--num-samples", str(args.num_samples), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or os.environ.get("OMP_NUM_THREADS", ""))}
    env = {k: v for k, v in env.items() if v != ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{procs} process(es) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| processes | threads each | s (timed run) | images x it / s | speedup | efficiency | images hash |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['seconds']:.2f} | "
                     f"{r['images_x_iterations_per_s']:.1f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% | "
                     f"`{r['images_hash']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process); default cpu")
    p.add_argument("--procs", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--method", default="spdfq", help="synthesis method (default spdfq, the synth default)")
    p.add_argument("--model", help="model (default: the bundled model)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="iterations of the untimed warm-up run (default 2)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per pass (default 16; the shards are whole passes, so N processes make the "
                        "1-process images bit for bit)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="runs per process count, the fastest counts")
    p.add_argument("--note", default="", help="a remark stored with the results (e.g. what else ran)")
    p.add_argument("--output", default=str(ROOT / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    procs = [int(v) for v in args.procs.split(",")]
    load_before = os.getloadavg()
    best: dict[int, dict[str, Any]] = {}
    for rep in range(args.repeats):
        for n in procs:
            r = launch(args, n)
            logger.info("run %d, %d process(es): %.2f s", rep + 1, n, r["seconds"])
            if n not in best or r["seconds"] < best[n]["seconds"]:
                best[n] = r
    base = best[procs[0]]["seconds"] * procs[0]
    rows = []
    for n in procs:
        r = dict(best[n])
        r["images_x_iterations_per_s"] = args.num_samples * args.iters / r["seconds"]
        r["speedup"] = base / r["seconds"]
        r["efficiency"] = r["speedup"] / n
        rows.append(r)
    command = "python experiments/synth_scaling.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                      " " + shlex.join(sys.argv[1:] if argv is None else argv))
    result = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_1_5_15_min_before": [round(v, 2) for v in load_before],
                    "load_average_1_5_15_min_after": [round(v, 2) for v in os.getloadavg()]},
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "output")},
        "rows": rows,
        "same_images": len({r["images_hash"] for r in rows}) == 1,
    }
    from dfq_deploy.utils import atomic_write_json, atomic_write_text

    out = Path(args.output)
    stem = f"synth-scaling-{args.device.split(':')[0]}"
    atomic_write_json(out / f"{stem}.json", result)
    md = (f"# Synthesis scaling over processes ({args.device}, {args.method}, {args.num_samples} images x "
          f"{args.iters} iterations, {args.batch_size or 'all'} images a pass)\n\n"
          f"Command: `{command}` ({result['date']}, {result['machine']['cpus']} CPUs, load average "
          f"{load_before[0]:.1f} before the runs)\n\n{table(rows)}\n\n"
          f"Same images on every process count: {'yes' if result['same_images'] else 'NO'}.\n"
          + (f"\nNote: {args.note}\n" if args.note else ""))
    atomic_write_text(out / f"{stem}.md", md)
    print(md)
    return result


if __name__ == "__main__":
    main()
