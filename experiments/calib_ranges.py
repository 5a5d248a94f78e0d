"""Where the data-free calibration sets lose accuracy: activation ranges or correction fits.

For a simulated low-bit preset (default W4A3, where synthetic and real calibration differ most), two
measurements on the accuracy grid's calibration sets (shared through its cache, so nothing is synthesised
twice; made and saved here when missing):

1. **Ranges**: every activation quantizer's scale chosen on each source, as ``log2(scale_source / scale_real)``
   averaged over blocks and seeds per quantizer kind (qkv input = LayerNorm-1 output, fc1 input = LayerNorm-2
   output, fc2 input = GELU output, ``p_quant`` = softmax output, ...). 0 means the same range as real images.
2. **Swap**: simulated top-1 with the activation ranges from one set (``R``) and the closed-form ``diag``
   correction fitted on another (``C``, or none), for ``real`` and each ``--swap-sources`` method, per seed.
   If ``R=real, C=method`` scores near ``R=real, C=real``, the method's images are good enough for the
   correction and the gap lies in the ranges.

Usage:
    python experiments/calib_ranges.py --threads 1        # the committed result (README, "Where the gap is")
Writes ``experiments/results/calib-ranges-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dfq_deploy
from dfq_deploy.config import preset
from dfq_deploy.data import load_images
from dfq_deploy.models import ModelSpec, create_model, data_config, parse_model_kwargs
from dfq_deploy.quant.correct import fit_corrections_
from dfq_deploy.quant.correct.fold import fold_corrections_
from dfq_deploy.quant.qmodel import act_quantizers, batches_loop, quantize
from dfq_deploy.utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("calib_ranges")


def _grid_module() -> Any:
    from dfq_deploy.bench import grid

    return grid


def quantizer_kind(name: str) -> str:
    """``blocks.3.attn.qkv.input_quantizer`` -> ``qkv.input``; ``blocks.3.attn.p_quant`` -> ``attn.p_quant``."""
    parts = name.split(".")
    if parts[-1] == "input_quantizer":
        return f"{parts[-2]}.input"
    return ".".join(parts[-2:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="W4A3")
    p.add_argument("--sources", default="noise,psaq,spdfq,dfqvit", help="compared with real for the ranges")
    p.add_argument("--swap-sources", default="dfqvit", help="methods in the range/correction swap")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "results"))
    args, grid_argv = p.parse_known_args(argv)
    grid = _grid_module()
    # the grid's own settings (model, data, --limit, --synth-iters, --threads, --cache ...) pick its cache
    gargs = grid.parse_args(["--synth-iters", "200", "--limit", "1000", *grid_argv])
    if gargs.threads:
        torch.set_num_threads(gargs.threads)
    spec = ModelSpec(gargs.model, gargs.checkpoint, parse_model_kwargs(gargs.model_kwargs), gargs.random_weights)
    base = create_model(spec)
    dcfg = data_config(base)
    cache = grid.CellCache(gargs, spec, base)
    cfg = preset(args.preset)
    x_eval, y_eval = load_images(gargs.data, dcfg, limit=gargs.limit, seed=0)
    sources = args.sources.split(",")
    swap = args.swap_sources.split(",") if args.swap_sources else []

    def calib(source: str, seed: int) -> torch.Tensor:
        return cache.calib(source, seed, grid.calib_maker(gargs, base, dcfg, source, seed))[0]

    def top1(model: torch.nn.Module) -> float:
        with torch.no_grad():
            logits = torch.cat([model(x_eval[i : i + 250]) for i in range(0, len(x_eval), 250)])
        return float((logits.argmax(-1) == y_eval).float().mean())

    # 1. ranges
    scales: dict[str, dict[str, list[float]]] = {}
    for source in ["real", *sources]:
        for seed in range(args.seeds):
            q = quantize(copy.deepcopy(base), cfg, batches_loop(calib(source, seed)))
            for name, aq in act_quantizers(q):
                scales.setdefault(source, {}).setdefault(name, []).append(float(aq.scale))
    kinds: dict[str, list[str]] = {}
    for name in scales["real"]:
        kinds.setdefault(quantizer_kind(name), []).append(name)

    def log_ratio(source: str, names: list[str]) -> float:
        ratios = [math.log2(a / b) for n in names for a, b in zip(scales[source][n], scales["real"][n], strict=True)]
        return sum(ratios) / len(ratios)

    ranges = {kind: {s: round(log_ratio(s, names), 3) for s in sources} for kind, names in kinds.items()}

    # 2. swap
    swaps: list[dict[str, Any]] = []
    for method in swap:
        for seed in range(args.seeds):
            sets = {"real": calib("real", seed), method: calib(method, seed)}
            for r in ("real", method):
                ranged = quantize(copy.deepcopy(base), cfg, batches_loop(sets[r]))  # once per range source
                for c in ("none", "real", method):
                    t = time.perf_counter()
                    q = copy.deepcopy(ranged)
                    if c != "none":
                        fit_corrections_(q, base, sets[c], "diag", seed=seed)
                        fold_corrections_(q)
                    row = {"method": method, "seed": seed, "ranges": r, "correction": c, "top1": top1(q),
                           "seconds": round(time.perf_counter() - t, 1)}
                    logger.warning("%s seed %d: ranges %s, correction %s: %.4f", method, seed, r, c, row["top1"])
                    swaps.append(row)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "model": spec.to_dict(), "preset": args.preset, "n_eval": len(y_eval), "seeds": args.seeds,
        "num_samples": gargs.num_samples, "synth_iters": gargs.synth_iters, "dfq_deploy": dfq_deploy.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "log2_scale_vs_real": ranges, "swap": swaps,
    }
    out = Path(args.output)
    stem = out / f"calib-ranges-{spec.name}"
    atomic_write_json(stem.with_suffix(".json"), result)
    md = render(result, sources)
    atomic_write_text(stem.with_suffix(".md"), md)
    print(md)
    return result


def render(result: dict[str, Any], sources: list[str]) -> str:
    lines = [f"Activation ranges at {result['preset']}: mean log2(scale / scale on real images) per quantizer kind "
             f"({result['seeds']} seeds, {result['num_samples']} images):", "",
             "| quantizer | " + " | ".join(sources) + " |", "| --- |" + " --- |" * len(sources)]
    for kind, row in result["log2_scale_vs_real"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{row[s]:+.2f}" for s in sources) + " |")
    if result["swap"]:
        lines += ["", f"Simulated top-1 (%) at {result['preset']} on {result['n_eval']} images, ranges from R, "
                  "diag correction fitted on C (mean over seeds, per-seed values in brackets):", "",
                  "| method | ranges R | correction C | top-1 |", "| --- | --- | --- | --- |"]
        groups: dict[tuple[str, str, str], list[float]] = {}
        for row in result["swap"]:
            groups.setdefault((row["method"], row["ranges"], row["correction"]), []).append(100 * row["top1"])
        for (method, r, c), vals in groups.items():
            per_seed = ", ".join(f"{v:.1f}" for v in vals)
            lines.append(f"| {method} | {r} | {c} | {sum(vals) / len(vals):.2f} ({per_seed}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    main()
