"""Data-free mixed precision: one format per unit, chosen from the sensitivity table to meet a budget.

``export --auto bits:3`` (average weight bits), ``--auto size:1.2`` (MB the graph's weights take, exactly as
stored), ``--auto drop:0.5`` (the largest predicted top-1 drop, points) or ``--auto latency:MS`` (only with a cost
table: no speed model is invented). The choice is an integer program: a binary ``x[u, f]`` per unit and format,
one format per unit, minimising the summed sensitivity (mean KL on held-back probes,
:mod:`~dfq_deploy.quant.sensitivity`) under the budget, solved by SciPy's ``milp`` (HiGHS). ``drop`` minimises the
weight bytes under a KL cap instead, the cap bisected until the whole mixed model's data-free estimate
(:mod:`~dfq_deploy.quant.estimate`) is within the drop.

The result is a :class:`~dfq_deploy.config.QuantConfig` whose ``layers`` name every unit's format, so it goes
through :func:`~dfq_deploy.quant.recipe.quantize_`, the exporter and the checks like any preset.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dfq_deploy.config import JsonConfig, QuantConfig, layer_preset
from dfq_deploy.errors import DfqError
from dfq_deploy.quant.estimate import estimate_accuracy, estimate_probes
from dfq_deploy.quant.qmodel import batches_loop, quantize
from dfq_deploy.quant.sensitivity import DEFAULT_CACHE, is_float_format, probe_logits, sensitivity_table

logger = logging.getLogger(__name__)

BUDGET_KINDS = ("bits", "abits", "size", "drop", "latency")
#: Activation quantizers a unit holds, for ``abits``: a Linear's input; an attention group's Q, K, softmax and V.
ACT_QUANTIZERS = {"linear": 1, "attn": 4}
#: Formats TensorRT runs, the default candidates: float (FP16), INT8 W8A8, and 4/3/2-bit weight-only grids.
DEPLOYABLE_FORMATS = ("FP16", "W8A8", "W4A16", "W3A16", "W2A16")
#: The search's probes are drawn with this seed offset, apart from the export's own estimate probes.
SEARCH_SEED_OFFSET = 1
#: Probes the sensitivities are measured on (the search's cost is ``units x formats`` passes of them).
SEARCH_PROBES = 128
_BISECT_STEPS = 8


@dataclass(frozen=True)
class AutoConfig(JsonConfig):
    """What ``--auto`` searches.

    Attributes:
        budget: ``KIND:VALUE`` with KIND in :data:`BUDGET_KINDS`: ``bits`` (average weight bits of the block
            Linears, the grids' bits as Model Optimizer's ``effective_bits``), ``abits`` (average bits of the
            activation quantizers, 16 where a unit leaves them float: for the simulated low-bit activation
            formats, which differ in activations only), ``size`` (MB of the whole graph's
            weights as stored: 2- and 3-bit grids in INT4 containers, the rest FP16), ``drop`` (largest predicted
            top-1 drop, points), ``latency`` (ms, summed from ``cost_table``).
        formats: candidate formats (preset names; ``FP16`` is the float layer). Simulated formats (``W4A4``,
            ...) make a simulated result.
        probes: held-back synthetic probes the sensitivities are measured on.
        cost_table: JSON of measured per-unit latencies for ``latency`` (``{"source": "...", "units": {unit:
            {format: ms}}, "rest_ms": ms}``), e.g. filled by ``bench`` on the target GPU.
        cache_dir: sensitivity-table cache (None: none).
    """

    budget: str = "bits:4"
    formats: tuple[str, ...] = DEPLOYABLE_FORMATS
    probes: int = SEARCH_PROBES
    cost_table: str | None = None
    cache_dir: str | None = str(DEFAULT_CACHE)

    what: ClassVar[str] = "auto config"

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        kind, value = self.kind, self.value  # validates the budget
        if not self.formats:
            raise DfqError("--auto-formats is empty: name at least one format, e.g. FP16,W8A8,W4A16")
        for fmt in self.formats:
            layer_preset(fmt)
        if self.probes < 8:
            raise DfqError(f"--auto probes {self.probes}: use at least 8")
        if kind == "latency" and self.cost_table is None:
            raise DfqError("--auto latency needs --cost-table FILE with measured per-unit latencies (no speed model "
                           "is assumed): measure them on the target GPU, or use bits:, size: or drop:")
        if kind in ("bits", "abits", "size", "latency") and value <= 0 or kind == "drop" and value < 0:
            raise DfqError(f"--auto {self.budget}: the budget must be positive")

    @property
    def kind(self) -> str:
        kind, sep, _ = self.budget.partition(":")
        if not sep or kind not in BUDGET_KINDS:
            raise DfqError(f"--auto {self.budget!r} is not KIND:VALUE with KIND one of {', '.join(BUDGET_KINDS)} "
                           "(e.g. bits:4.5, size:1.5, drop:0.5)")
        return kind

    @property
    def value(self) -> float:
        try:
            return float(self.budget.partition(":")[2])
        except ValueError:
            raise DfqError(f"--auto {self.budget!r}: the value after ':' must be a number (e.g. bits:4.5)") from None


def _milp(cost: np.ndarray, unit_of: np.ndarray, n_units: int, budget_row: np.ndarray | None,
          budget: float | None) -> np.ndarray | None:
    """Binary choice ``x`` minimising ``cost @ x``, one per unit, ``budget_row @ x <= budget``; None: infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    one = np.zeros((n_units, len(cost)))
    one[unit_of, np.arange(len(cost))] = 1.0
    cons = [LinearConstraint(one, 1, 1)]
    if budget_row is not None:
        cons.append(LinearConstraint(budget_row[None, :], -np.inf, budget))
    res = milp(cost, constraints=cons, integrality=np.ones(len(cost)), bounds=Bounds(0, 1))
    return None if res.x is None else res.x > 0.5


def _columns(table: dict[str, Any], cost_table: dict[str, Any] | None) -> list[dict[str, Any]]:
    cols = []
    for u, row in enumerate(table["units"]):
        for fmt, v in row["formats"].items():
            ms = None
            if cost_table is not None:
                ms = cost_table["units"].get(row["name"], {}).get(fmt)
                if ms is None:
                    raise DfqError(f"--cost-table has no latency for {row['name']} in {fmt}: measure it, or leave "
                                   f"{fmt} out of --auto-formats")
            n_act = ACT_QUANTIZERS[row["kind"]]
            cols.append({"unit": u, "fmt": fmt, "kl": v["kl"], "bytes": v["bytes"],
                         "bit_params": v["bits"] * row["params"], "ms": ms,
                         "abits": (layer_preset(fmt).a_bits or 16) * n_act, "n_act": n_act})
    return cols


def solve(table: dict[str, Any], auto: AutoConfig, rest_bytes: float = 0.0, kl_cap: float | None = None,
          cost_table: dict[str, Any] | None = None) -> dict[str, str]:
    """One format per unit under ``auto``'s budget (``drop`` with a ``kl_cap``: the fewest bytes under the cap).

    Args:
        table: :func:`~dfq_deploy.quant.sensitivity.sensitivity_table`.
        auto: the budget.
        rest_bytes: bytes of everything outside the units (``size``).
        kl_cap: summed-KL cap for ``drop``.
        cost_table: the loaded ``cost_table`` for ``latency``.

    Raises:
        DfqError: no assignment meets the budget (one line saying the least the formats allow).
    """
    cols = _columns(table, cost_table)
    unit_of = np.array([c["unit"] for c in cols])
    n = len(table["units"])
    kl = np.array([c["kl"] for c in cols])
    kind = auto.kind
    if kind == "drop":
        x = _milp(np.array([c["bytes"] for c in cols]), unit_of, n, kl, kl_cap)
    else:
        if kind == "bits":
            total = sum(r["params"] for r in table["units"])
            row, budget = np.array([c["bit_params"] for c in cols]) / total, auto.value
        elif kind == "abits":
            total = sum(ACT_QUANTIZERS[r["kind"]] for r in table["units"])
            row, budget = np.array([c["abits"] for c in cols]) / total, auto.value
        elif kind == "size":
            row, budget = np.array([c["bytes"] for c in cols]), auto.value * 1e6 - rest_bytes
        else:
            assert cost_table is not None
            row, budget = np.array([c["ms"] for c in cols]), auto.value - float(cost_table.get("rest_ms", 0.0))
        x = _milp(kl, unit_of, n, row, budget)
        if x is None:
            least = _milp(row, unit_of, n, None, None)
            assert least is not None
            floor = float(row[least].sum()) + (rest_bytes if kind == "size" else 0.0)
            shown = {"bits": f"{floor:.2f} bits", "abits": f"{floor:.2f} bits", "size": f"{floor / 1e6:.3f} MB",
                     "latency": f"{floor:.3f} ms"}
            raise DfqError(f"--auto {auto.budget} is below the least the formats {','.join(auto.formats)} allow "
                           f"({shown[kind]}): raise the budget or add a smaller format")
    if x is None:
        raise DfqError(f"--auto {auto.budget}: no assignment under the KL cap")
    return {table["units"][c["unit"]]["name"]: c["fmt"] for c, chosen in zip(cols, x, strict=True) if chosen}


def mixed_config(assignment: dict[str, str], name: str) -> QuantConfig:
    """A float base config whose ``layers`` give each unit its format (float units are left out)."""
    layers: dict[str, str | dict[str, Any]] = {u: f for u, f in assignment.items() if not is_float_format(f)}
    return QuantConfig(name=name, w_bits=None, a_bits=None, layers=layers or None)


def _predicted(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor, probes: torch.Tensor,
               fp: np.ndarray) -> dict[str, Any]:
    qm = copy.deepcopy(model)
    quantize(qm, cfg, batches_loop(calib))
    return estimate_accuracy(fp, probe_logits(qm, probes))


def rest_bytes(model: nn.Module, table: dict[str, Any]) -> float:
    """FP16 bytes of the parameters outside the units (embeddings, norms, biases, head)."""
    return 2.0 * (sum(p.numel() for p in model.parameters()) - sum(r["params"] for r in table["units"]))


def auto_quant_config(model: nn.Module, calib: torch.Tensor, auto: AutoConfig, seed: int = 0,
                      progress: bool = False) -> tuple[QuantConfig, dict[str, Any]]:
    """Search one format per unit of the float ``model`` (left unchanged) under ``auto``'s budget.

    Returns:
        The mixed :class:`~dfq_deploy.config.QuantConfig` and the search's report: the budget, every unit's format
        with its sensitivity and bytes, the totals, and the times.
    """
    t0 = time.perf_counter()
    probes = estimate_probes(calib, auto.probes, seed + SEARCH_SEED_OFFSET)
    table = sensitivity_table(model, calib, probes, auto.formats, auto.cache_dir, progress)
    cost = None
    if auto.cost_table is not None:
        path = Path(auto.cost_table)
        if not path.is_file():
            raise DfqError(f"--cost-table {path} not found: pass the JSON of measured latencies")
        cost = json.loads(path.read_text())
    rest = rest_bytes(model, table)
    t1 = time.perf_counter()
    name = f"auto-{auto.budget}"
    search: dict[str, Any] = {}
    if auto.kind == "drop":  # bisect the summed-KL cap on the whole mixed model's predicted drop
        fp = probe_logits(model, probes)
        lo, hi = 0.0, sum(max(v["kl"] for v in r["formats"].values()) for r in table["units"])
        assignment = {r["name"]: min(r["formats"], key=lambda f, r=r: r["formats"][f]["kl"]) for r in table["units"]}
        best = (assignment, _predicted(model, mixed_config(assignment, name), calib, probes, fp))
        for _ in range(_BISECT_STEPS):
            cap = (lo + hi) / 2
            trial = solve(table, auto, rest, kl_cap=cap)
            est = _predicted(model, mixed_config(trial, name), calib, probes, fp)
            if est["predicted_drop"] <= auto.value:
                best, lo = (trial, est), cap
            else:
                hi = cap
        assignment, search["predicted_without_correction"] = best
    else:
        assignment = solve(table, auto, rest, cost_table=cost)
    by_name = {r["name"]: r for r in table["units"]}
    units = [{"unit": u, "kind": by_name[u]["kind"], "format": f, **by_name[u]["formats"][f]}
             for u, f in assignment.items()]
    params = sum(r["params"] for r in table["units"])
    report = {
        "budget": auto.budget, "formats": list(auto.formats), "units": units,
        "effective_bits": sum(u["bits"] * by_name[u["unit"]]["params"] for u in units) / params,
        "activation_bits": sum((layer_preset(u["format"]).a_bits or 16) * ACT_QUANTIZERS[u["kind"]] for u in units)
        / sum(ACT_QUANTIZERS[u["kind"]] for u in units),
        "weight_bytes": sum(u["bytes"] for u in units) + rest,
        "summed_kl": sum(u["kl"] for u in units),
        "counts": {f: sum(u["format"] == f for u in units) for f in auto.formats},
        "sensitivity_s": table["seconds"], "sensitivity_cached": table["cached"],
        "search_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0,
        "probes": {"count": len(probes), "seed_offset": SEARCH_SEED_OFFSET}, **search,
    }
    if cost is not None:
        report["latency_ms"] = sum(cost["units"][u["unit"]][u["format"]] for u in units) + cost.get("rest_ms", 0.0)
        report["latency_source"] = cost.get("source", "unstated")
    logger.info("auto %s: %s; %.2f effective bits, %.3f MB of weights, search %.1f s", auto.budget,
                ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v), report["effective_bits"],
                report["weight_bytes"] / 1e6, report["total_s"])
    return mixed_config(assignment, name), report
