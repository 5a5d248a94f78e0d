"""How well the data-free accuracy estimate predicts the measured top-1 drop: validation on the accuracy grid.

Every grid cell (preset x calibration source x seed) carries the export's estimate
(:mod:`dfq_deploy.quant.estimate`, on held-back synthetic probes, on the same artifact whose top-1 is measured:
ONNX Runtime for deployable presets, the PyTorch fake-quant model for simulated ones). The measured drop is the
FP32 graph's top-1 minus the cell's, in points. Reported: Spearman rank correlation over cells, over
(preset, source) means, and over presets within each source; mean absolute error and bias; how many cells that
lose more than :data:`~dfq_deploy.quant.estimate.FLAG_DROP_POINTS` the estimate flags, and how many it flags
that do not; the cells where it is off by more than a point.

Run through ``experiments/estimator.py`` (which runs the grid first).
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from dfq_deploy.bench.grid import parse_args, run_grid, write_outputs
from dfq_deploy.quant.estimate import FLAG_DROP_POINTS
from dfq_deploy.utils import atomic_write_bytes, figure_png

logger = logging.getLogger(__name__)


def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def validate(result: dict[str, Any]) -> dict[str, Any]:
    """Predicted vs measured drop over the grid's cells (see the module docstring)."""
    fp = next(c for c in result["cells"] if c["preset"] == "FP32")["top1"]
    rows = [{"preset": c["preset"], "source": c["source"], "seed": c["seed"],
             "simulated": c["measured_on"].startswith("simulated"),
             "measured": 100 * (fp - c["top1"]), "predicted": c["estimate"]["predicted_drop"],
             "interval": c["estimate"]["interval"], "agreement": c["estimate"]["agreement"],
             "kl": c["estimate"]["kl"]}
            for c in result["cells"] if c["preset"] != "FP32"]
    means: dict[tuple[str, str], dict[str, float]] = {}
    for key in dict.fromkeys((r["preset"], r["source"]) for r in rows):
        rs = [r for r in rows if (r["preset"], r["source"]) == key]
        means[key] = {k: statistics.fmean(r[k] for r in rs) for k in ("measured", "predicted")}
    per_source = {}
    for source in dict.fromkeys(s for _, s in means):
        keys = [k for k in means if k[1] == source]
        per_source[source] = _spearman([means[k]["predicted"] for k in keys], [means[k]["measured"] for k in keys])
    errors = [r["predicted"] - r["measured"] for r in rows]
    lossy = [r for r in rows if r["measured"] > FLAG_DROP_POINTS]
    flagged = [r for r in rows if r["predicted"] > FLAG_DROP_POINTS]
    return {
        "fp32_top1": fp, "cells": rows, "n_cells": len(rows),
        "spearman_cells": _spearman([r["predicted"] for r in rows], [r["measured"] for r in rows]),
        "spearman_means": _spearman([v["predicted"] for v in means.values()], [v["measured"] for v in means.values()]),
        "spearman_by_source": per_source,
        "mae": statistics.fmean(abs(e) for e in errors), "bias": statistics.fmean(errors),
        "lossy_cells": len(lossy), "lossy_flagged": sum(r["predicted"] > FLAG_DROP_POINTS for r in lossy),
        "false_flags": sum(r["measured"] <= FLAG_DROP_POINTS for r in flagged),
        "off_by_more_than_1": [r for r in rows if abs(r["predicted"] - r["measured"]) > 1.0],
        "interval_covers": sum(r["interval"][0] <= r["measured"] <= r["interval"][1] for r in rows),
    }


def markdown(v: dict[str, Any], result: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    lines = [
        f"Data-free accuracy estimate vs measured top-1 drop, `{result['model']['name']}`, {v['n_cells']} cells "
        f"({result['seeds']} seeds x presets x sources), {result['n_eval']} `dev` images, FP32 "
        f"{100 * v['fp32_top1']:.2f}%. Command: `{result['command']}`.", "",
        f"* Spearman rank correlation, predicted vs measured drop: cells {f(v['spearman_cells'])}, "
        f"(preset, source) means {f(v['spearman_means'])}; presets within each source: "
        + ", ".join(f"{s} {f(r)}" for s, r in v["spearman_by_source"].items()) + ".",
        f"* Error (predicted - measured, points): mean absolute {v['mae']:.2f}, bias {v['bias']:+.2f}; the 95% "
        f"bootstrap interval covers the measured drop in {v['interval_covers']} of {v['n_cells']} cells (it counts "
        "only the probes' sampling, not the probes' difference from real images).",
        f"* Cells losing more than {FLAG_DROP_POINTS:g} point: {v['lossy_cells']}, flagged {v['lossy_flagged']}; "
        f"flagged cells that lose less: {v['false_flags']}.",
        f"* Off by more than 1 point: {len(v['off_by_more_than_1'])} cells"
        + (": " + ", ".join(f"{r['preset']}/{r['source']}/{r['seed']} ({r['predicted']:.1f} vs {r['measured']:.1f})"
                             for r in v["off_by_more_than_1"][:12]) if v["off_by_more_than_1"] else "") + ".",
        "", "| preset | source | measured drop | predicted drop | agreement (%) |", "| --- | --- | --- | --- | --- |",
    ]
    keys = list(dict.fromkeys((r["preset"], r["source"]) for r in v["cells"]))
    for p, s in keys:
        rs = [r for r in v["cells"] if (r["preset"], r["source"]) == (p, s)]
        star = "*" if rs[0]["simulated"] else ""
        lines.append(f"| {p}{star} | {s} | {statistics.fmean(r['measured'] for r in rs):.2f} | "
                     f"{statistics.fmean(r['predicted'] for r in rs):.2f} | "
                     f"{100 * statistics.fmean(r['agreement'] for r in rs):.1f} |")
    lines += ["", "\\* simulated (PyTorch fake-quant); the others measured and estimated on the exported ONNX in "
              "ONNX Runtime. Means over seeds."]
    return "\n".join(lines) + "\n"


def plot(v: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for sim, marker in ((False, "o"), (True, "^")):
        rs = [r for r in v["cells"] if r["simulated"] == sim]
        ax.scatter([r["measured"] for r in rs], [r["predicted"] for r in rs], marker=marker, s=18, alpha=0.7,
                   label="simulated" if sim else "ONNX Runtime")
    hi = max([1.0] + [max(r["measured"], r["predicted"]) for r in v["cells"]]) * 1.05
    lo = min([0.0] + [min(r["measured"], r["predicted"]) for r in v["cells"]]) - 0.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.axhline(FLAG_DROP_POINTS, color="gray", lw=0.8)
    ax.axvline(FLAG_DROP_POINTS, color="gray", lw=0.8)
    ax.set_xlabel("measured top-1 drop on dev (points)")
    ax.set_ylabel("predicted drop, no data (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=110))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the accuracy grid (its flags), then validate the estimate on its cells."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_grid(args)
    result["command"] = "python " + " ".join(sys.argv)
    v = validate(result)
    stem = Path(args.output) / f"estimator-{result['model']['name']}{args.tag}"
    write_outputs(stem, {"grid": {k: r for k, r in result.items() if k != "cells"}, **v}, markdown(v, result),
                  lambda png: plot(v, png, f"{result['model']['name']}: data-free estimate vs measured"))
    return v
