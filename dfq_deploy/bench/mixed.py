"""The mixed-precision benchmark: top-1 against weight size for the automatic choice, uniform presets and a naive
assignment, over seeds.

For each seed: the calibration set (the accuracy grid's cache), the sensitivity table
(:mod:`dfq_deploy.quant.sensitivity`, cached), then one cell a configuration, each quantized with the export's
recipe, exported, and measured on the artifact in ONNX Runtime (:func:`dfq_deploy.bench.grid.run_cell`):

* ``auto bits:B`` for each budget (:mod:`dfq_deploy.quant.search`);
* the uniform presets (``W8A8``, ``W4A16``, ``W3A16``, ``W2A16``);
* naive assignments: the first and last blocks at the higher format and the others at the lower one
  (``ends W4A16 / W2A16``, ``ends W4A16 / W3A16``).

x: effective weight bits of the block Linears (Model Optimizer's ``effective_bits``; 2- and 3-bit grids are stored
in INT4 containers, so the file does not shrink below 4 bits: the stored MB are in the table too); y: top-1 on
``dev`` (a trained model) or top-1 agreement with the float graph on ``dev`` (``--random-weights``, whose labels
mean nothing). Run through ``experiments/mixed_precision.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dfq_deploy
from dfq_deploy.bench.grid import (
    CellCache,
    _short_hash,
    calib_maker,
    float_probe_logits,
    parse_args,
    run_cell,
    write_outputs,
)
from dfq_deploy.config import QuantConfig, layer_preset
from dfq_deploy.data import load_images
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import ort_logits
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config, parse_model_kwargs, transformer_blocks
from dfq_deploy.quant.estimate import estimate_probes
from dfq_deploy.quant.qmodel import quant_units
from dfq_deploy.quant.search import (
    ACT_QUANTIZERS,
    DEPLOYABLE_FORMATS,
    SEARCH_SEED_OFFSET,
    AutoConfig,
    auto_quant_config,
    rest_bytes,
)
from dfq_deploy.quant.sensitivity import sensitivity_table
from dfq_deploy.synth import SOURCES, CalibRequest
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, figure_png

logger = logging.getLogger(__name__)

#: The two comparisons: ``weights`` (deployable formats, x = effective weight bits) and ``activations`` (the
#: simulated low-bit activation formats at 4-bit weights, where the CIFAR-10 model is sensitive; x = average
#: activation bits). Each: candidate formats, uniform presets (highest first), naive (high, low) pairs, budgets.
REGIMES: dict[str, dict[str, Any]] = {
    "weights": {"formats": DEPLOYABLE_FORMATS, "uniform": ("W8A8", "W4A16", "W3A16", "W2A16"),
                "naive": (("W4A16", "W2A16"), ("W4A16", "W3A16")), "x": "effective_bits",
                "budgets": "bits:2.25,bits:2.5,bits:3,bits:4,bits:8"},
    "activations": {"formats": ("W4A8", "W4A4", "W4A3"), "uniform": ("W4A8", "W4A4", "W4A3"),
                    "naive": (("W4A8", "W4A3"), ("W4A8", "W4A4")), "x": "activation_bits",
                    "budgets": "abits:3.5,abits:4,abits:5,abits:6"},
}


def naive_config(model: torch.nn.Module, high: str, low: str) -> QuantConfig:
    """First and last transformer blocks at ``high``, every other unit at ``low``."""
    blocks = transformer_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    ends = (names[id(blocks[0])], names[id(blocks[-1])])
    layers: dict[str, str | dict[str, Any]] = {}
    for unit, kind in quant_units(model):
        fmt = high if unit.startswith(ends) else low
        if kind == "linear" or layer_preset(fmt).a_bits is not None:
            layers[unit] = fmt
    return QuantConfig(name=f"ends {high} / {low}", w_bits=None, a_bits=None, layers=layers)


def weight_stats(table: dict[str, Any], cfg: QuantConfig, rest: float) -> dict[str, float]:
    """Effective bits of the block Linears, stored MB of the weights (from the table's sizes) and average
    activation bits (16 where float) for ``cfg``."""
    params = sum(r["params"] for r in table["units"])
    bits = stored = abits = n_act = 0.0
    for r in table["units"]:
        c = cfg.for_layer(r["name"])
        k = ACT_QUANTIZERS[r["kind"]]
        abits += (c.a_bits or 16) * k
        n_act += k
        if r["kind"] != "linear":
            continue
        fmt = c.name if c.w_bits is not None else "FP16"
        size = r["formats"].get(fmt) or r["formats"]["FP16"]
        bits += (c.w_bits or 16) * r["params"]
        stored += size["bytes"] if c.w_bits is not None else 2.0 * r["params"]
    return {"effective_bits": bits / params, "weight_mb": (stored + rest) / 1e6, "activation_bits": abits / n_act}


def run(args: argparse.Namespace, budgets: list[str], regime: str, tiny: str | None = None) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if tiny is not None:  # a tiny random-weight model of TINY_CONFIGS (kwargs with tuples, e.g. Swin's depths)
        name, kwargs = TINY_CONFIGS[tiny]
        args.model, args.random_weights = name, True
        spec = ModelSpec(name, kwargs=dict(kwargs), random_weights=True)
    else:
        spec = ModelSpec(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs), args.random_weights)
    base = create_model(spec)
    dcfg = data_config(base)
    cache = CellCache(args, spec, base)
    x_eval, y_eval = load_images(args.data, dcfg, limit=args.limit, seed=0)
    fp_proto = to_onnx(copy.deepcopy(base), tuple(dcfg["input_size"]), dtype="fp32")
    fp_pred = ort_logits(fp_proto, x_eval, args.threads).argmax(-1)
    kind = "agreement" if args.random_weights else "accuracy"
    truth = fp_pred if args.random_weights else y_eval.numpy()

    def acc(logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == truth).mean())

    fp_top1 = float((fp_pred == truth).mean())
    held = SOURCES.get("noise")(base, CalibRequest(args.num_samples, 10_000, dcfg)).images
    source = args.sources.split(",")[0]
    reg = REGIMES[regime]
    formats = tuple(reg["formats"])
    sens_dir = Path(args.cache).expanduser() / "sens"  # one sensitivity table a seed, shared by every budget
    cells: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        calib, _ = cache.calib(source, seed, calib_maker(args, base, dcfg, source, seed))
        configs: list[tuple[str, str, QuantConfig, dict[str, Any]]] = []
        for budget in budgets:
            t = time.perf_counter()
            auto = AutoConfig(budget=budget, formats=formats, cache_dir=str(sens_dir))
            cfg, rep = auto_quant_config(base, calib, auto, seed=seed)
            configs.append((f"auto {budget}", "auto", cfg, {"search_s": time.perf_counter() - t,
                                                           "sensitivity_s": rep["sensitivity_s"],
                                                           "sensitivity_cached": rep["sensitivity_cached"],
                                                           "counts": rep["counts"]}))
        configs += [(p, "uniform", layer_preset(p), {}) for p in reg["uniform"]]
        configs += [(f"ends {h} / {lo}", "naive", naive_config(base, h, lo), {}) for h, lo in reg["naive"]]
        probes = estimate_probes(calib, AutoConfig().probes, seed + SEARCH_SEED_OFFSET)
        table = sensitivity_table(base, calib, probes, formats, sens_dir)  # read from the cache
        rest = rest_bytes(base, table)
        fp_probe: np.ndarray | None = None
        for name, family, cfg, extra in configs:
            path = cache.root / "mixed" / f"cell-{_short_hash([name, cfg.to_dict(), source, seed, kind])}.json"
            if path.is_file() and not args.fresh:  # finished before: an interrupted run resumes
                cell = json.loads(path.read_text())
            else:
                if fp_probe is None:
                    fp_probe = float_probe_logits(base, calib, seed)
                cell = run_cell(args, base, dcfg, name, source, seed, calib, held, x_eval, acc, cfg=cfg,
                                fp_probe=fp_probe)
                cell.update(family=family, **weight_stats(table, cfg, rest), **extra)
                atomic_write_json(path, cell)
            cells.append(cell)
            logger.warning("%-22s seed %d: %s %.4f, %.2f weight bits, %.2f activation bits, %.3f MB", name, seed,
                           kind, cell["top1"], cell["effective_bits"], cell["activation_bits"], cell["weight_mb"])
    rows = []
    for name in dict.fromkeys(c["preset"] for c in cells):
        cs = [c for c in cells if c["preset"] == name]
        rows.append({"config": name, "family": cs[0]["family"], "n_seeds": len(cs),
                     "top1_mean": statistics.fmean(c["top1"] for c in cs),
                     "top1_std": statistics.stdev(c["top1"] for c in cs) if len(cs) > 1 else 0.0,
                     "effective_bits": statistics.fmean(c["effective_bits"] for c in cs),
                     "weight_mb": statistics.fmean(c["weight_mb"] for c in cs),
                     "activation_bits": statistics.fmean(c["activation_bits"] for c in cs),
                     "predicted_drop": statistics.fmean(c["estimate"]["predicted_drop"] for c in cs),
                     "search_s": statistics.fmean(c["search_s"] for c in cs) if "search_s" in cs[0] else None,
                     "measured_on": cs[0]["measured_on"]})
    return {"command": "python " + " ".join(sys.argv), "model": spec.to_dict(), "kind": kind, "source": source,
            "data": args.data, "n_eval": len(truth), "seeds": args.seeds, "synth_iters": args.synth_iters,
            "formats": list(formats), "budgets": budgets, "regime": regime, "x": reg["x"], "float_top1": fp_top1,
            "threads": args.threads,
            "dfq_deploy": dfq_deploy.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rows": rows, "cells": cells, "goals": goals(rows, reg["uniform"], reg["x"])}


def _interp(rows: list[dict[str, Any]], bits: float, x: str) -> float | None:
    """Top-1 of the automatic choice at ``bits`` of ``x``, read off its curve (linear between budgets)."""
    pts = sorted((r[x], r["top1_mean"]) for r in rows if r["family"] == "auto")
    for (b0, a0), (b1, a1) in zip(pts, pts[1:], strict=False):
        if b0 <= bits <= b1:
            return a0 + (a1 - a0) * (bits - b0) / (b1 - b0) if b1 > b0 else max(a0, a1)
    return next((a for b, a in pts if abs(b - bits) < 1e-6), None)


def goals(rows: list[dict[str, Any]], uniform: tuple[str, ...], x: str) -> dict[str, Any]:
    """The goals: auto at or above each uniform preset at equal bits (``x``); at each lower preset's bits, the share
    of the gap to the next preset up that it recovers."""
    by = {r["config"]: r for r in rows}
    out: dict[str, Any] = {"at_or_above_uniform": {}}
    for p in uniform:
        if p not in by:
            continue
        auto = _interp(rows, by[p][x], x)
        out["at_or_above_uniform"][p] = None if auto is None else {
            "auto": auto, "uniform": by[p]["top1_mean"], "ok": auto >= by[p]["top1_mean"] - 1e-9}
    for high, low in zip(uniform, uniform[1:], strict=False):
        if low in by and high in by:
            auto = _interp(rows, by[low][x], x)
            gap = by[high]["top1_mean"] - by[low]["top1_mean"]
            out[f"gap_{low}_to_{high}"] = {"gap_points": 100 * gap, "auto": auto,
                                           "recovered": None if auto is None or gap <= 0 else
                                           (auto - by[low]["top1_mean"]) / gap}
    return out


def markdown(res: dict[str, Any]) -> str:
    y = "top-1 (%)" if res["kind"] == "accuracy" else "top-1 agreement with the float graph (%)"
    simulated = [r["config"] for r in res["rows"] if r["measured_on"].startswith("simulated")]
    where = ("measured on the exported ONNX in ONNX Runtime" if not simulated else
             "simulated in PyTorch fake-quant (these activation grids have no deployable kernel)"
             if len(simulated) == len(res["rows"]) else
             f"measured on the exported ONNX in ONNX Runtime, except {', '.join(simulated)} (simulated)")
    lines = [f"Mixed precision on `{res['model']['name']}`"
             + (f" ({res['model'].get('kwargs')}, random weights)" if res["kind"] == "agreement" else "")
             + f": {y} on {res['n_eval']} `dev` images, mean ± std over {res['seeds']} seeds, calibration "
             f"`{res['source']}` ({res['synth_iters']} iterations), {where}. "
             f"Float: {100 * res['float_top1']:.2f}. Command: `{res['command']}`.", "",
             f"| config | kind | effective weight bits | activation bits | weights as stored (MB) | {y} | "
             "predicted drop | search (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(res["rows"], key=lambda r: (-r[res["x"]], r["family"])):
        search = "" if r["search_s"] is None else f"{r['search_s']:.0f}"
        lines.append(f"| {r['config']} | {r['family']} | {r['effective_bits']:.2f} | {r['activation_bits']:.2f} | "
                     f"{r['weight_mb']:.3f} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} | "
                     f"{r['predicted_drop']:.2f} | {search} |")
    g = res["goals"]
    lines += ["", "Goals:"]
    for p, v in g["at_or_above_uniform"].items():
        if v is not None:
            lines.append(f"* at {p}'s bits: auto {100 * v['auto']:.2f} vs {p} {100 * v['uniform']:.2f} "
                         f"({'met' if v['ok'] else 'NOT met'})")
        else:
            lines.append(f"* at {p}'s bits: no automatic point that low or high")
    for k, v in g.items():
        if k.startswith("gap_"):
            rec = (f"{100 * v['recovered']:.0f}% recovered" if v["recovered"] is not None else
                   "no automatic point at those bits" if v["auto"] is None else "no gap to recover")
            lines.append(f"* {k[4:].replace('_to_', ' -> ')}: gap {v['gap_points']:.2f} points, {rec}")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family, marker in (("auto", "o-"), ("uniform", "s"), ("naive", "^")):
        rs = sorted((r for r in res["rows"] if r["family"] == family), key=lambda r: r[res["x"]])
        ax.errorbar([r[res["x"]] for r in rs], [100 * r["top1_mean"] for r in rs],
                    yerr=[100 * r["top1_std"] for r in rs], fmt=marker, capsize=3, label=family)
        if family != "auto":
            for r in rs:
                ax.annotate(r["config"], (r[res["x"]], 100 * r["top1_mean"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
    ax.axhline(100 * res["float_top1"], color="k", ls="--", lw=1, label="float")
    ax.set_xlabel({"effective_bits": "effective weight bits (block Linears)",
                   "activation_bits": "average activation bits (16 where float)"}[res["x"]])
    ax.set_ylabel("top-1 (%)" if res["kind"] == "accuracy" else "top-1 agreement with float (%)")
    ax.set_title(f"{res['model']['name']}: mixed precision, {res['seeds']} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=110))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--regime", choices=sorted(REGIMES), default="weights")
    extra.add_argument("--budgets", help="comma list of --auto budgets (default: the regime's)")
    extra.add_argument("--tiny", choices=sorted(TINY_CONFIGS), help="a tiny random-weight model instead of --model")
    mine, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    budgets = (mine.budgets or REGIMES[mine.regime]["budgets"]).split(",")
    res = run(args, budgets, mine.regime, mine.tiny)
    regime = "" if mine.regime == "weights" else f"-{mine.regime}"
    smoke = "-smoke" if args.smoke else ""
    stem = Path(args.output) / f"mixed-{res['model']['name']}{'-tiny' if mine.tiny else ''}{regime}{args.tag}{smoke}"
    write_outputs(stem, res, markdown(res), lambda png: plot(res, png))
    return res
