"""Accuracy grid: every calibration source x every preset x several seeds, on the artifact that ships.

The harness behind ``experiments/accuracy.py`` (which only calls :func:`main`), and the cache, cells and
summaries other experiments read (``experiments/calib_ranges.py``).

Deployable presets (W8A8, W4A16, W3A16, W2A16) are exported to QDQ ONNX and evaluated in ONNX Runtime (CPU,
optimizations on, INT4 MatMulNBits at accuracy level 0 so activations stay float). Research presets (W3A3,
W4A3, W4A4, W5A5, W6A6: every matmul input quantized, MSE ranges; ``--log2`` adds log2 softmax variants; the
papers' protocol ``W4A4-paper``, ``W4A3-paper``, ``W3A3-paper``; variants ``PRESET:key=value``) have
no deployable kernel: they are evaluated on the PyTorch fake-quant model and labelled "simulated" everywhere.
Deployable graphs are exported in ``--dtype`` (default FP16, the graph ``dfq-deploy export`` ships for
TensorRT). FP32 is the float PyTorch model exported to an FP32 ONNX graph and run in ONNX Runtime.

Calibration sets are made once per (source, seed) and shared by every preset; the wall time of synthesis,
calibration and export is recorded per cell. Every finished cell (and every calibration set) is saved at once
under ``--cache`` in a folder keyed by the model weights and the grid settings, so an interrupted run continues
where it stopped, and two processes with disjoint ``--sources`` can share the work (a last run with all
sources then only assembles the table). ``--fresh`` ignores saved cells.

Usage:
    python experiments/accuracy.py                       # full grid on the bundled model, 3 seeds, all of dev
    python experiments/accuracy.py --synth-iters 200 --limit 1000 --threads 1   # the committed results (README)
    python experiments/accuracy.py --quick               # one seed, 500 images, 100 synthesis iterations (< 10 min)
    python experiments/accuracy.py --smoke --model deit_t \
        --model-kwargs img_size=32,patch_size=4,depth=1,num_classes=10 --random-weights   # harness test
Writes ``experiments/results/accuracy-<model>[-quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dfq_deploy
from dfq_deploy.config import CORRECTION_MODES, DEVICE_CHOICES, GRAPH_DTYPES, CorrectionConfig, QuantConfig, preset
from dfq_deploy.data import default_cifar10, load_images
from dfq_deploy.device import resolve_device
from dfq_deploy.errors import DfqError
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import ort_logits, run_torch
from dfq_deploy.models import BUNDLED_MODEL, ModelSpec, create_model, data_config, parse_model_kwargs
from dfq_deploy.quant.estimate import estimate_accuracy, estimate_probes
from dfq_deploy.quant.recipe import quantize_
from dfq_deploy.quant.sensitivity import probe_logits
from dfq_deploy.synth import METHODS, SOURCES, CalibRequest
from dfq_deploy.synth.checkpoint import model_fingerprint, save_checkpoint
from dfq_deploy.synth.loop import SYNTH_REVISION
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, figure_png

logger = logging.getLogger(__name__)
#: Where the committed results live in a source checkout (``experiments/results``); ``--output`` elsewhere.
DEFAULT_OUTPUT = Path("experiments") / "results"
DEPLOYABLE = ["W8A8", "W4A16", "W3A16", "W2A16"]
SIMULATED = ["W6A6", "W5A5", "W4A4", "W4A3", "W3A3"]
#: The symmetric presets with a log2 softmax (the one activation quantizer that needs no data): where data-free
#: calibration matches real images (experiments/results/accuracy-deit_tiny_cifar10.md).
LOG2_SOFTMAX = ["W4A4-log2", "W4A3-log2", "W3A3-log2"]
#: The papers' protocol (asymmetric activations, log2 softmax, 8-bit patch embedding and head): comparable with
#: the data-free ViT papers' tables.
PAPER = ["W4A4-paper", "W4A3-paper", "W3A3-paper"]
DEFAULT_PRESETS = DEPLOYABLE + SIMULATED + LOG2_SOFTMAX + PAPER
EXTRA_SIMULATED = ["W4A8"]  # not in the default grid; for the reparameterisation comparison
#: The float formats (``--presets FP8,NVFP4,NVFP4-W4A16``): FP8 is measured on its exported graph in ONNX Runtime
#: (ORT 1.32 runs FP8 Q/DQ on the CPU), NVFP4 is simulated (ORT has no FP4 kernels).
FLOAT_FORMATS = ["FP8", "NVFP4", "NVFP4-W4A16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--checkpoint")
    p.add_argument("--model-kwargs")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--data", default=str(default_cifar10("dev")), help="evaluation ImageFolder")
    p.add_argument("--calib-dir", default=str(default_cifar10("calib-real")), help="ImageFolder for 'real'")
    p.add_argument("--sources", default="all",
                   help="comma list of calibration sources (default: all registered); a variant with options is "
                        "written NAME:key=value+key=value, e.g. dfqvit:global_frac=0 (ablations)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="comma list of presets; a variant is written PRESET:key=value+key=value with QuantConfig "
                        "fields, e.g. W4A3:a_grid=asymmetric+a_calib=sequential (ablations)")
    p.add_argument("--log2", action="store_true", help="also simulate log2 softmax quantizers (W4A4-log2, ...)")
    p.add_argument("--dtype", default=GRAPH_DTYPES[0], choices=GRAPH_DTYPES,
                   help="compute type of the deployable graphs (default: what dfq-deploy export writes)")
    p.add_argument("--correct", default=CorrectionConfig.mode, choices=CORRECTION_MODES,
                   help="closed-form correction, as in dfq-deploy export (default diag)")
    p.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=CorrectionConfig.shrink,
                   help="shrink each output correction towards the identity, strength chosen on held-out images")
    p.add_argument("--reparam", action="store_true", help="fold per-channel LayerNorm scales (RepQ-ViT) first")
    p.add_argument("--reconstruct", action="store_true", help="block-wise reconstruction before the correction")
    p.add_argument("--reconstruct-iters", type=int, default=CorrectionConfig.reconstruct_iters,
                   help="reconstruction Adam steps per block")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. -corrections)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of this many images")
    p.add_argument("--synth-iters", type=int, default=None, help="override synthesis iterations")
    p.add_argument("--quick", action="store_true", help="one seed, 500 images, 100 synthesis iterations")
    p.add_argument("--smoke", action="store_true", help="two cells, a few images (harness test)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: all cores)")
    p.add_argument("--device", default=DEVICE_CHOICES[0],
                   help="where synthesis, calibration and corrections run: auto, cpu, cuda or cuda:N")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "dfq_deploy" / "accuracy"),
                   help="folder of finished cells and calibration sets (resume)")
    p.add_argument("--fresh", action="store_true", help="recompute every cell")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.limit = 1, args.limit or 500
        args.synth_iters = args.synth_iters or 100
    if args.smoke:
        args.seeds, args.limit, args.synth_iters = 1, args.limit or 8, args.synth_iters or 2
        args.num_samples = min(args.num_samples, 4)
        if args.sources == "all":
            args.sources = "noise"
        if args.presets == ",".join(DEFAULT_PRESETS):
            args.presets = "W4A16,W4A4"
    return args


def preset_config(pname: str) -> QuantConfig:
    """The config of a grid column: a preset, ``<preset>-log2`` for its log2-softmax variant, or
    ``<preset>:key=value+key=value`` for a preset with some :class:`~dfq_deploy.config.QuantConfig` fields changed."""
    base, _, variant = pname.partition(":")
    cfg = preset(base.removesuffix("-log2"))
    if base.endswith("-log2"):
        cfg = cfg.with_(attn_log2=True, name=base)
    if variant:
        changes = parse_model_kwargs(variant.replace("+", ","))
        unknown = set(changes) - set(cfg.to_dict()) | ({"name", "version"} & set(changes))
        if unknown:
            raise DfqError(f"preset variant '{pname}': {', '.join(sorted(unknown))} is not a QuantConfig field "
                           "that a variant can change")
        cfg = cfg.with_(**changes, name=pname)
    return cfg


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class CellCache:
    """Finished cells as one JSON file each, calibration sets as tensors; all writes atomic.

    Layout: ``<cache>/<model>-<weights fingerprint>/calib-<source>-<seed>-<hash>.pt`` (shared by every grid on
    that model; the hash covers the sample count, iterations, ``--calib-dir`` and ``SYNTH_REVISION``, and the
    source carries its method's revision, see :meth:`source_key`) and
    ``.../cells-<settings hash>/cell-<preset>-<config hash>-<source>-<seed>.json`` (the settings hash also covers
    the package version), so a changed setting, preset definition or package version never reuses a cell.
    """

    def __init__(self, args: argparse.Namespace, spec: ModelSpec, model: torch.nn.Module) -> None:
        self.model_root = Path(args.cache).expanduser() / f"{spec.name}-{model_fingerprint(model)[:16]}"
        calib = {"num_samples": args.num_samples, "synth_iters": args.synth_iters, "version": SYNTH_REVISION,
                 "calib_dir": str(Path(args.calib_dir).resolve())}
        settings = {**calib, "package": dfq_deploy.__version__, "model": spec.to_dict(),
                    "data": str(Path(args.data).resolve()), "limit": args.limit,
                    "correct": args.correct, "reconstruct": args.reconstruct and args.reconstruct_iters,
                    "reparam": args.reparam, **({"shrink": True} if args.shrink else {})}
        self.root = self.model_root / f"cells-{_short_hash(settings)}"
        self.calib_tag = _short_hash(calib)
        self.fresh = args.fresh
        self.dtype = args.dtype
        self._calibs: dict[Path, tuple[torch.Tensor, float]] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def source_key(source: str) -> str:
        """``source`` in file names: with ``@r<N>`` once its method's :attr:`SynthMethod.revision` is N > 0."""
        name = source.partition(":")[0]
        revision = METHODS.get(name).revision if name in METHODS.names() else 0
        return f"{source}@r{revision}" if revision else source

    def _cell(self, pname: str, source: str, seed: int) -> Path:
        cfg = {} if pname in ("FP32", "FP16") else preset_config(pname).key_dict()
        dtype = f"-{self.dtype}" if pname not in ("FP32", "FP16") and measured(preset_config(pname)) else ""
        return self.root / f"cell-{pname}-{_short_hash(cfg)}{dtype}-{self.source_key(source)}-{seed}.json"

    def get_cell(self, pname: str, source: str, seed: int) -> dict[str, Any] | None:
        path = self._cell(pname, source, seed)
        cell = None if self.fresh or not path.is_file() else json.loads(path.read_text())
        if cell is not None and pname != "FP32" and "estimate" not in cell:
            return None  # made before the data-free estimate existed: made again, with it
        return cell

    def put_cell(self, cell: dict[str, Any]) -> None:
        atomic_write_json(self._cell(cell["preset"], cell["source"], cell["seed"]), cell)

    def calib(self, source: str, seed: int, make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The calibration set of (source, seed) and its synthesis time: saved, or made now and saved."""
        path = self.model_root / f"calib-{self.source_key(source)}-{seed}-{self.calib_tag}.pt"
        if path not in self._calibs:  # made (or read) once per run, shared by every preset
            if not self.fresh and path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                self._calibs[path] = saved["images"], float(saved["synthesis_s"])
            else:
                t = time.perf_counter()
                images = make()
                self._calibs[path] = images, time.perf_counter() - t
                save_checkpoint(path, {"images": images, "synthesis_s": self._calibs[path][1]})
        return self._calibs[path]


def calib_maker(args: argparse.Namespace, base: torch.nn.Module, dcfg: dict[str, Any], source: str,
                seed: int) -> Callable[[], torch.Tensor]:
    """A function that makes the calibration set of ``source`` (``NAME`` or ``NAME:key=value+...``) and seed."""
    name, _, variant = source.partition(":")
    options: dict[str, Any] = parse_model_kwargs(variant.replace("+", ","))
    if name in METHODS.names():
        options["progress"] = False
        if args.synth_iters:
            options.setdefault("iterations", args.synth_iters)

    def make() -> torch.Tensor:
        return SOURCES.get(name)(base, CalibRequest(args.num_samples, seed, dcfg, args.calib_dir, options)).images

    return make


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # --random-weights: the same model (and cache) on every run
    spec = ModelSpec(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs), args.random_weights)
    base = create_model(spec)
    dcfg = data_config(base)
    cache = CellCache(args, spec, base)  # keyed on the weights, before they move: the same cache on any device
    base.to(resolve_device(args.device))  # the PyTorch stages run there; ONNX Runtime on the CPU
    logger.warning("cells are saved in %s", cache.root)
    x_eval, y_eval = load_images(args.data, dcfg, limit=args.limit, seed=0)
    y_eval = y_eval.numpy()
    sources = SOURCES.names() if args.sources == "all" else args.sources.split(",")
    presets = args.presets.split(",")
    if args.log2:
        presets += [f"{p}-log2" for p in presets if p in SIMULATED + EXTRA_SIMULATED]
    threads = args.threads or torch.get_num_threads()
    cells: list[dict[str, Any]] = []
    held = SOURCES.get("noise")(base, CalibRequest(args.num_samples, 10_000, dcfg)).images  # for error reports

    def acc(logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == y_eval).mean())

    fp32 = cache.get_cell("FP32", "-", 0)
    if fp32 is None:
        t = time.perf_counter()
        fp_proto = to_onnx(copy.deepcopy(base), tuple(dcfg["input_size"]), dtype="fp32")
        fp32 = {"preset": "FP32", "source": "-", "seed": 0, "top1": acc(ort_logits(fp_proto, x_eval, args.threads)),
                "measured_on": "onnxruntime (fp32 graph)", "threads": threads,
                "times": {"export_s": time.perf_counter() - t}}
        cache.put_cell(fp32)
    cells.append(fp32)
    logger.warning("FP32 (onnxruntime): %.4f", fp32["top1"])
    if any(p.partition(":")[0] in FLOAT_FORMATS for p in presets):  # the float FP16 graph: the formats' reference
        fp16 = cache.get_cell("FP16", "-", 0)
        if fp16 is None:
            t = time.perf_counter()
            proto = to_onnx(copy.deepcopy(base), tuple(dcfg["input_size"]), dtype="fp16", calib=held)
            fp16 = {"preset": "FP16", "source": "-", "seed": 0, "top1": acc(ort_logits(proto, x_eval, args.threads)),
                    "measured_on": "onnxruntime (fp16 graph)", "threads": threads,
                    "times": {"export_s": time.perf_counter() - t}}
            cache.put_cell(fp16)
        cells.append(fp16)
        logger.warning("FP16 (onnxruntime): %.4f", fp16["top1"])
    fp_probes: dict[tuple[str, int], np.ndarray] = {}  # the float model's estimate-probe logits, per calib set
    for source in sources:
        for seed in range(args.seeds):
            for pname in presets:
                cell = cache.get_cell(pname, source, seed)
                if cell is None:
                    calib_images, synth_s = cache.calib(source, seed, calib_maker(args, base, dcfg, source, seed))
                    if (source, seed) not in fp_probes:
                        fp_probes[source, seed] = float_probe_logits(base, calib_images, seed)
                    cell = run_cell(args, base, dcfg, pname, source, seed, calib_images, held, x_eval, acc,
                                    fp_probe=fp_probes[source, seed])
                    cell["threads"] = threads
                    cell["times"] = {"synthesis_s": synth_s, **cell["times"]}
                    cache.put_cell(cell)
                    logger.warning("%-10s %-7s seed %d: %.4f (%s)", pname, source, seed, cell["top1"],
                                   cell["measured_on"])
                cells.append(cell)
    summary = summarize(cells)
    return {
        "command": "python " + " ".join(sys.argv),
        "model": spec.to_dict(), "data": args.data, "n_eval": len(y_eval), "calib_dir": args.calib_dir,
        "num_samples": args.num_samples, "seeds": args.seeds, "correct": args.correct, "shrink": args.shrink,
        "dtype": args.dtype,
        "reconstruct": args.reconstruct and args.reconstruct_iters, "reparam": args.reparam,
        "synth_iters": args.synth_iters, "threads": threads, "torch": torch.__version__,
        "dfq_deploy": dfq_deploy.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": cells,
        "summary": summary, "gap_closed": gap_closed(summary),
    }


def float_probe_logits(base: torch.nn.Module, calib_images: torch.Tensor, seed: int) -> np.ndarray:
    """The float model's logits on the estimate probes of a calibration set: one pass, shared by its cells."""
    return probe_logits(base, estimate_probes(calib_images, seed=seed))


def run_cell(args: argparse.Namespace, base: torch.nn.Module, dcfg: dict[str, Any], pname: str, source: str,
             seed: int, calib_images: torch.Tensor, held: torch.Tensor, x_eval: torch.Tensor,
             acc: Callable[[np.ndarray], float], cfg: QuantConfig | None = None,
             fp_probe: np.ndarray | None = None) -> dict[str, Any]:
    """Quantize a copy of ``base`` with one preset (or ``cfg``, named ``pname``) and calibration set; top-1 on the
    artifact or simulated, and the data-free estimate on the same model (``fp_probe``: the float model's logits on
    the estimate probes of ``calib_images`` and ``seed``, :func:`float_probe_logits`, computed here if None)."""
    cfg = preset_config(pname) if cfg is None else cfg
    model = copy.deepcopy(base)
    t = time.perf_counter()
    stages: dict[str, float] = {}
    correction = CorrectionConfig(mode=args.correct, shrink=args.shrink, reparam=args.reparam,
                                  reconstruct=args.reconstruct, reconstruct_iters=args.reconstruct_iters)
    corr = quantize_(model, cfg, calib_images, correction, held=held, seed=seed, timings=stages)
    cell = {"preset": pname, "source": source, "seed": seed, "correct": corr.get("mode"),
            "times": {"calibration_s": time.perf_counter() - t, **stages}}
    probes = estimate_probes(calib_images, seed=seed)  # the export's data-free estimate, on the same artifact
    if measured(cfg):
        t = time.perf_counter()
        proto = to_onnx(model, tuple(dcfg["input_size"]), dtype=args.dtype, calib=calib_images)  # as export
        cell["times"]["export_s"] = time.perf_counter() - t
        cell["top1"] = acc(ort_logits(proto, x_eval, args.threads))
        cell["measured_on"] = f"onnxruntime ({args.dtype} graph)"
        q_probe = ort_logits(proto, probes, args.threads)
    else:
        cell["top1"], cell["measured_on"] = acc(run_torch(model, x_eval, batch_size=250)), "simulated (pytorch)"
        q_probe = run_torch(model, probes, batch_size=250)
    fp_probe = float_probe_logits(base, calib_images, seed) if fp_probe is None else fp_probe
    cell["estimate"] = estimate_accuracy(fp_probe, q_probe, seed=seed)
    return cell


def measured(cfg: QuantConfig) -> bool:
    """True when a grid cell of ``cfg`` is measured on its exported graph in ONNX Runtime (deployable, and ORT runs
    it); the others are simulated in PyTorch."""
    return cfg.is_float or (cfg.deployable and cfg.runs_in_ort)


def gap_closed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset and data-free source: the share of the noise-to-real accuracy gap it closes."""
    by = {(r["preset"], r["source"]): r["top1_mean"] for r in rows}
    out = []
    for pname in dict.fromkeys(r["preset"] for r in rows):
        noise, real = by.get((pname, "noise")), by.get((pname, "real"))
        if noise is None or real is None:
            continue
        for (p, source), value in by.items():
            if p == pname and source not in ("noise", "real", "-"):
                gap = real - noise
                out.append({"preset": pname, "source": source, "noise_to_real_gap": gap,
                            "closed": (value - noise) / gap if abs(gap) > 1e-9 else None})
    return out


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (sample std) of top-1 per (preset, source)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["preset"], c["source"]), []).append(c)
    rows = []
    for (pname, source), cs in groups.items():
        accs = [c["top1"] for c in cs]
        rows.append({"preset": pname, "source": source, "n_seeds": len(accs), "top1_mean": statistics.fmean(accs),
                     "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "measured_on": cs[0]["measured_on"],
                     "mean_times": {k: statistics.fmean(c["times"].get(k, 0.0) for c in cs)
                                    for k in cs[0]["times"]}})
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows = result["summary"]
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["preset"] not in ("FP32", "FP16")))
    sources = list(dict.fromkeys(r["source"] for r in rows if r["source"] != "-"))
    fp = next(r for r in rows if r["preset"] == "FP32")
    by = {(r["preset"], r["source"]): r for r in rows}
    sim = {r["preset"] for r in rows if r["measured_on"].startswith("simulated")}
    lines = [
        f"Top-1 (%) of `{result['model']['name']}` on {result['n_eval']} images of `{result['data']}`, "
        f"mean ± std over {result['seeds']} seed(s), {result['num_samples']} calibration images, "
        f"correction `{result['correct']}`" + (" shrunk by held-out images" if result.get("shrink") else "")
        + (f" after {result['reconstruct']}-step block reconstruction" if result.get("reconstruct") else "")
        + (", LayerNorm reparameterisation" if result.get("reparam") else "")
        + ". "
        f"FP32 (ONNX Runtime): {100 * fp['top1_mean']:.2f}"
        + "".join(f", FP16 graph (ONNX Runtime): {100 * r['top1_mean']:.2f}" for r in rows if r["preset"] == "FP16")
        + ". Columns marked * are simulated in PyTorch "
        "(no deployable kernel); the others are measured on the exported ONNX in ONNX Runtime.",
        "",
        "| source | " + " | ".join(p + ("*" if p in sim else "") for p in presets) + " |",
        "| --- |" + " --- |" * len(presets),
    ]
    for s in sources:
        cells = []
        for p in presets:
            r = by.get((p, s))
            cells.append(f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}" if r else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    closed = {(g["preset"], g["source"]): g for g in result.get("gap_closed", [])}
    methods = list(dict.fromkeys(src for _, src in closed))
    if methods:
        lines += ["", "Share of the noise-to-real gap each data-free method closes ((method - noise) / (real - noise); "
                  "gap in points in the header):", "",
                  "| method | " + " | ".join(
                      f"{p} ({100 * closed[(p, methods[0])]['noise_to_real_gap']:+.1f})" if (p, methods[0]) in closed
                      else p for p in presets) + " |",
                  "| --- |" + " --- |" * len(presets)]
        for m in methods:
            vals = [closed.get((p, m), {}).get("closed") for p in presets]
            lines.append(f"| {m} | " + " | ".join("" if v is None else f"{100 * v:.0f}%" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    simulated = {r["preset"] for r in rows if r["measured_on"].startswith("simulated")}
    for ax, kind in zip(axes, ("deployable", "simulated"), strict=True):
        presets = [p for p in dict.fromkeys(r["preset"] for r in rows)
                   if p not in ("FP32", "FP16") and (p in simulated) == (kind == "simulated")]
        for s in dict.fromkeys(r["source"] for r in rows if r["source"] != "-"):
            pts = [(p, r) for p in presets for r in rows if r["preset"] == p and r["source"] == s]
            if pts:
                ax.errorbar([p for p, _ in pts], [100 * r["top1_mean"] for _, r in pts],
                            yerr=[100 * r["top1_std"] for _, r in pts], marker="o", capsize=3, label=s)
        fp = next(r for r in rows if r["preset"] == "FP32")
        ax.axhline(100 * fp["top1_mean"], color="k", ls="--", lw=1, label="FP32")
        ax.set_title(f"{kind} ({'ONNX Runtime' if kind == 'deployable' else 'PyTorch fake-quant'})")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']['name']}: accuracy by bit width and calibration source")
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=110))


def write_outputs(stem: Path, data: dict[str, Any], md: str, draw: Callable[[Path], None]) -> None:
    """A benchmark's results: ``stem.json``, ``stem.md`` and ``stem.png`` (``draw`` writes it), each atomically; the
    Markdown is printed too."""
    atomic_write_json(stem.with_suffix(".json"), data)
    atomic_write_text(stem.with_suffix(".md"), md)
    draw(stem.with_suffix(".png"))
    print(md)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_grid(args)
    suffix = "-smoke" if args.smoke else "-quick" if args.quick else ""
    stem = Path(args.output) / f"accuracy-{result['model']['name']}{args.tag}{suffix}"
    write_outputs(stem, result, markdown(result), lambda png: plot(result, png))
    print(f"wrote {stem}.json/.md/.png")
    return result
