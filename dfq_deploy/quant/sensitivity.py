"""Per-unit sensitivity: what quantizing one unit alone, in one format, costs the model's outputs.

A unit is a block Linear (its weight and input quantizer) or an attention module's matmul group
(:func:`~dfq_deploy.quant.qmodel.quant_units`). For each candidate format (a preset name; ``FP16`` is the float
layer) the model is quantized once with that format everywhere (ranges from the calibration images, as
:func:`~dfq_deploy.quant.qmodel.quantize` chooses them), every quantizer is switched off, and then each unit's
quantizers alone are switched on while the estimate probes run through the model. A unit's sensitivity in a format
is the mean ``KL(p_float || p_quant)`` on the probes (and the soft-label drop of :mod:`~dfq_deploy.quant.estimate`,
in points). That is ``1 + units x formats`` forward passes of the probes, no correction fitted: the mixed model is
corrected afterwards like any export. Each pass starts at the unit's transformer block, from the block inputs the
float pass recorded (the blocks before it are float then), which halves the work on average.

The table is cached (JSON, keyed on the model's weights, the calibration images, the probes and the formats): it is
the expensive part of a search, and one table serves every budget.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dfq_deploy
from dfq_deploy.config import FLOAT_LAYER_NAMES, QuantConfig, layer_preset
from dfq_deploy.device import exact_float32, model_device
from dfq_deploy.models import transformer_blocks
from dfq_deploy.progress import Progress
from dfq_deploy.quant.estimate import kl_divergence, soft_drop
from dfq_deploy.quant.qmodel import batches_loop, fit_block, quant_units, quantize, set_quant_enabled_
from dfq_deploy.synth.checkpoint import model_fingerprint
from dfq_deploy.utils import atomic_write_json

logger = logging.getLogger(__name__)

#: Default cache folder of sensitivity tables.
DEFAULT_CACHE = Path.home() / ".cache" / "dfq_deploy" / "sensitivity"
#: Bytes of one weight scale in the FP16 graph.
SCALE_BYTES = 2


def is_float_format(fmt: str) -> bool:
    return fmt.upper() in FLOAT_LAYER_NAMES


def applies(fmt: str, kind: str) -> bool:
    """Whether ``fmt`` quantizes a unit of ``kind``: an attention group only has activations."""
    cfg = layer_preset(fmt)
    return kind == "linear" or (cfg.a_bits is not None and cfg.a_scope == "matmul")


def unit_size(module: nn.Module, kind: str, fmt: str) -> dict[str, float]:
    """Weight storage of one unit in one format: ``bits`` (the grid's, for effective bits), ``bytes`` (what the
    graph stores: 2- and 3-bit grids in an INT4 container, one FP16 scale per channel or block) and ``params``."""
    if kind != "linear":
        return {"params": 0, "bits": 0.0, "bytes": 0.0}
    out_f, in_f = module.weight.shape
    params = out_f * in_f
    cfg = layer_preset(fmt)
    if cfg.w_bits is None:
        return {"params": params, "bits": 16.0, "bytes": 2.0 * params}
    container = 8 if cfg.w_bits > 4 else 4
    groups = out_f * (in_f // fit_block(cfg.block_size, in_f) if cfg.w_granularity == "blockwise" else 1)
    return {"params": params, "bits": float(cfg.w_bits), "bytes": params * container / 8 + groups * SCALE_BYTES}


def _unit_quantizers(model: nn.Module, name: str) -> list[nn.Module]:
    mod = dict(model.named_modules()).get(name)
    if mod is None:
        return []
    if isinstance(mod, nn.Linear):
        return [q for q in (getattr(mod, "weight_quantizer", None), getattr(mod, "input_quantizer", None))
                if q is not None]
    return [q for k in ("q_quant", "k_quant", "p_quant", "v_quant") if (q := getattr(mod, k, None)) is not None]


def _cache_key(model: nn.Module, calib: torch.Tensor, probes: torch.Tensor, formats: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(model).encode())
    for t in (calib, probes):
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(json.dumps([list(formats), dfq_deploy.__version__]).encode())
    return h.hexdigest()[:20]


_BATCH = 128


@torch.no_grad()
def probe_logits(model: nn.Module, x: torch.Tensor, batch: int | None = None) -> np.ndarray:
    """``model``'s float32 logits on ``x``, in batches of ``batch`` (default :data:`_BATCH`), as numpy."""
    batch = batch or _BATCH
    dev = model_device(model)
    with exact_float32():
        return torch.cat([model(x[i:i + batch].to(dev)).float().cpu() for i in range(0, len(x), batch)]).numpy()


class _BlockReplay:
    """Run ``model`` from transformer block ``k`` on recorded block inputs: the blocks before ``k`` are swapped for
    ``nn.Identity`` (blocks keep their input's shape) and block ``k`` is fed the recorded input."""

    def __init__(self, model: nn.Module, probes: torch.Tensor) -> None:
        self.model, self.probes = model, probes
        self.blocks = transformer_blocks(model)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        hooks = [b.register_forward_pre_hook(lambda _m, args, i=i: self.inputs[i].append(args[0]))
                 for i, b in enumerate(self.blocks)]
        try:
            self.fp = probe_logits(model, probes)
        finally:
            for h in hooks:
                h.remove()

    def block_of(self, model: nn.Module) -> dict[str, int]:
        """Unit name -> index of the block that holds it (0 for a unit outside every block: a full pass)."""
        index = {id(m): i for i, b in enumerate(transformer_blocks(model)) for m in b.modules()}
        return {n: index.get(id(m), 0) for n, m in model.named_modules()}

    @torch.no_grad()
    def logits(self, qmodel: nn.Module, k: int) -> np.ndarray:
        """``qmodel``'s logits on the probes, run from block ``k`` (``qmodel``: a copy of the recorded model)."""
        if k == 0:
            return probe_logits(qmodel, self.probes)
        blocks = transformer_blocks(qmodel)
        parents = {id(m): (parent, name) for parent in qmodel.modules() for name, m in parent.named_children()}
        saved = [(parents[id(b)], b) for b in blocks[:k]]
        batch_no = iter(range(len(self.inputs[k])))
        hook = blocks[k].register_forward_pre_hook(lambda _m, _args: (self.inputs[k][next(batch_no)],))
        try:
            for (parent, name), _ in saved:
                setattr(parent, name, nn.Identity())
            out = probe_logits(qmodel, self.probes)
        finally:
            hook.remove()
            for (parent, name), b in saved:
                setattr(parent, name, b)
        return out


def sensitivity_table(model: nn.Module, calib: torch.Tensor, probes: torch.Tensor, formats: tuple[str, ...],
                      cache_dir: str | Path | None = DEFAULT_CACHE, progress: bool = False) -> dict[str, Any]:
    """The sensitivity of every unit of the float ``model`` in every format (``model`` is left unchanged).

    Args:
        model: a float timm ViT/DeiT/Swin.
        calib: calibration images (ranges).
        probes: estimate probes (:func:`~dfq_deploy.quant.estimate.estimate_probes`).
        formats: candidate formats, preset names (``FP16``, ``W8A8``, ``W4A16``, ``W3A16``, ``W2A16``, and the
            simulated ``W4A4`` ...).
        cache_dir: where tables are kept (None: no cache).
        progress: a bar on a terminal.

    Returns:
        ``{"units": [{"name", "kind", "params", "formats": {fmt: {"kl", "drop", "bits", "bytes"}}}], "formats",
        "probes", "seconds", "cached"}``; a format that does not apply to a unit (weight-only on an attention group)
        is absent from its ``formats``.
    """
    formats = tuple(dict.fromkeys(formats))
    for fmt in formats:
        layer_preset(fmt)  # unknown names fail here, in one line
    key = _cache_key(model, calib, probes, formats)
    path = Path(cache_dir).expanduser() / f"sensitivity-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        table = json.loads(path.read_text())
        table["cached"] = str(path)
        logger.info("sensitivity: read from the cache %s", path)
        return table
    t0 = time.perf_counter()
    units = quant_units(model)
    modules = dict(model.named_modules())
    rows = [{"name": n, "kind": k, "params": unit_size(modules[n], k, "FP16")["params"], "formats": {}}
            for n, k in units]
    replay = _BlockReplay(model, probes)
    fp = replay.fp
    quantized = [f for f in formats if not is_float_format(f)]
    steps = sum(applies(f, k) for f in quantized for _, k in units)
    with Progress(steps, "sensitivity", "unit", logger, bar=progress) as bar:
        for fmt in formats:
            cfg: QuantConfig = layer_preset(fmt)
            if is_float_format(fmt):
                for row in rows:
                    row["formats"][fmt] = {"kl": 0.0, "drop": 0.0, **_size(modules, row, fmt)}
                continue
            qm = copy.deepcopy(model)
            quantize(qm, cfg, batches_loop(calib))
            set_quant_enabled_(qm, False)
            start = replay.block_of(qm)
            for row in rows:
                if not applies(fmt, row["kind"]):
                    continue
                qs = _unit_quantizers(qm, row["name"])
                for q in qs:
                    q.enabled = True
                out = replay.logits(qm, start[row["name"]])
                for q in qs:
                    q.enabled = False
                row["formats"][fmt] = {"kl": float(kl_divergence(fp, out).mean()),
                                       "drop": float(100 * soft_drop(fp, out).mean()), **_size(modules, row, fmt)}
                bar.update()
            del qm
    table = {"units": rows, "formats": list(formats), "probes": len(probes),
             "seconds": time.perf_counter() - t0, "cached": None}
    if path is not None:
        atomic_write_json(path, table)
    logger.info("sensitivity: %d units x %d formats in %.1f s", len(rows), len(formats), table["seconds"])
    return table


def _size(modules: dict[str, nn.Module], row: dict[str, Any], fmt: str) -> dict[str, float]:
    s = unit_size(modules[row["name"]], row["kind"], fmt)
    return {"bits": s["bits"], "bytes": s["bytes"]}

