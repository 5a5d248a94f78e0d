"""The ``export`` job, top to bottom: model -> calibration set -> [reparameterise] -> quantize -> [reconstruct]
-> [correct and fold] -> QDQ ONNX -> lint -> parity -> eval.

Nothing is written to the output folder until every check has passed; then ``model.onnx``, the optional
``correction.png`` and ``report.json`` are each written atomically (and removed again if a later step fails).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dfq_deploy.config import (
    DEVICE_CHOICES,
    GRAPH_DTYPES,
    PARITY_THRESHOLD,
    CalibrationConfig,
    CorrectionConfig,
    QuantConfig,
    layer_preset,
    preset_for_bits,
)
from dfq_deploy.data import ImageFolder
from dfq_deploy.device import describe_device, resolve_device
from dfq_deploy.errors import DfqError
from dfq_deploy.export.evaluate import evaluate_onnx, evaluate_torch
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import fp32_nodes, save_onnx, to_onnx
from dfq_deploy.export.parity import NUM_PROBES, measure_parity, ort_logits, parity_probes, require_parity
from dfq_deploy.models import ModelSpec, class_names, create_model, data_config, require_checkpoint_file
from dfq_deploy.quant.correct import plot_block_errors
from dfq_deploy.quant.estimate import NUM_ESTIMATE_PROBES, describe, estimate_accuracy, estimate_probes
from dfq_deploy.quant.recipe import HELD_SEED_OFFSET, quantize_
from dfq_deploy.quant.search import AutoConfig, auto_quant_config
from dfq_deploy.quant.sensitivity import probe_logits
from dfq_deploy.synth import METHODS, CalibRequest, calibration_set, get_source, load_synth_dir
from dfq_deploy.synth.distributed import current, init_from_env
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, removed_if_left_empty

logger = logging.getLogger(__name__)

#: Calibration sources cheap enough to draw held-back parity inputs from.
CHEAP_SOURCES = ("noise", "real")


@dataclass
class ExportOptions:
    """Everything ``dfq-deploy export`` takes: what to build, the three configs of the recipe, and the checks.

    Attributes:
        model: which model to build.
        bits: 8 (W8A8), 4 (W4A16), 3 (W3A16), ``"fp8"`` (FP8), ``"nvfp4"`` (NVFP4), 16 or 32 (float graphs in FP16 /
            FP32); ignored when ``quant``
            is given.
        quant: the quantization config; None: the preset of ``bits``.
        calibration: where the calibration images come from.
        correction: what is fitted after the ranges and folded (:func:`dfq_deploy.quant.recipe.quantize_`).
        dtype: the graph's compute type (:data:`dfq_deploy.config.GRAPH_DTYPES`): ``fp16``, what TensorRT should
            build, or ``fp32`` for CPU runtimes; None: the bit width's own, ``fp32`` for ``bits=32`` and ``fp16``
            otherwise.
        output: output folder (``model.onnx``, ``report.json``).
        seed: RNG seed of the whole job.
        parity_threshold: minimum fraction of parity inputs on which ONNX Runtime agrees with PyTorch within
            rounding (:mod:`dfq_deploy.export.parity`); 0 skips the check.
        eval_data: ImageFolder to measure the exported graph's accuracy on (optional).
        eval_limit: evaluate a seeded subset of this many images.
        auto: search one format per unit under a budget (:mod:`dfq_deploy.quant.search`); its result replaces
            ``quant``, and with ``eval_data`` the float model's accuracy is measured too (the measured drop).
        progress: show progress bars.
        plot: write ``correction.png`` (per-block error before/after) beside ``report.json``.
        device: where the PyTorch stages run (synthesis, ranges, corrections, reconstruction, the PyTorch side
            of parity): ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``. ONNX export and
            ONNX Runtime run on the CPU.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    bits: int | str = 8
    quant: QuantConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    dtype: str | None = None
    output: str | Path = "out"
    seed: int = 0
    parity_threshold: float = PARITY_THRESHOLD
    eval_data: str | Path | None = None
    eval_limit: int | None = None
    auto: AutoConfig | None = None
    progress: bool = True
    plot: bool = False
    device: str = DEVICE_CHOICES[0]

    def __post_init__(self) -> None:
        if self.quant is None:
            self.quant = preset_for_bits(self.bits)
        bits_dtype = {16: "fp16", 32: "fp32"}.get(self.bits) if self.quant.is_float else None
        if self.dtype is None:
            self.dtype = bits_dtype or GRAPH_DTYPES[0]
        if self.dtype not in GRAPH_DTYPES:
            raise DfqError(f"--dtype {self.dtype} is unknown: use one of {', '.join(GRAPH_DTYPES)}")
        if bits_dtype and self.dtype != bits_dtype:
            raise DfqError(f"--bits {self.bits} is the {bits_dtype} float graph: drop --dtype {self.dtype}")
        if self.auto is not None and not all(layer_preset(f).deployable for f in self.auto.formats):
            bad = [f for f in self.auto.formats if not layer_preset(f).deployable]
            raise DfqError(f"--auto-formats {','.join(bad)} are simulated only (no TensorRT kernel): export with "
                           "deployable formats (FP16, W8A8, W4A16, W3A16, W2A16); simulated searches belong to "
                           "experiments/mixed_precision.py")
        if not self.quant.deployable:
            raise DfqError(f"{self.quant.name} is simulated only (no TensorRT kernel): export a deployable preset")
        if not 0.0 <= self.parity_threshold <= 1.0:
            raise DfqError(f"--parity-threshold {self.parity_threshold} must be between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (recorded in ``report.json``)."""
        assert self.quant is not None
        return {"model": self.model.to_dict(), "quant": self.quant.to_dict(),
                "auto": self.auto.to_dict() if self.auto is not None else None,
                "calibration": self.calibration.to_dict(), "correction": self.correction.to_dict(),
                "dtype": self.dtype, "seed": self.seed, "parity_threshold": self.parity_threshold,
                "device": self.device}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import timm

    import dfq_deploy

    return {"dfq_deploy": dfq_deploy.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dfq-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DfqError(f"output folder {out} is not writable ({exc.strerror}): choose another --output") from exc


def check_inputs(opts: ExportOptions) -> None:
    """Check every path and name the export will need before any long work starts.

    Raises:
        DfqError: unknown model or calibration source, missing checkpoint, missing or empty ImageFolder
            (``--eval-data``, ``--calib-dir``), unfinished ``--calib-from`` folder, or an unwritable output folder.
    """
    cal = opts.calibration
    opts.model.timm_name  # noqa: B018 - raises on an unknown model name
    resolve_device(opts.device)  # --device cuda without a GPU fails here, not after the synthesis
    if opts.model.checkpoint is not None:
        require_checkpoint_file(opts.model.checkpoint)
    if cal.calib_from is not None:
        load_synth_dir(cal.calib_from)
    elif _calibrates(opts):
        get_source(cal.source)
    if cal.calib_dir is not None and (cal.source == "real" or cal.calib_from is None):
        ImageFolder(cal.calib_dir)
    if opts.eval_data is not None:
        ImageFolder(opts.eval_data)
    if current(init_from_env(resolve_device(opts.device))).is_main:  # under torchrun, rank 0 writes the export
        _check_writable(Path(opts.output))


def _calibrates(opts: ExportOptions) -> bool:
    assert opts.quant is not None
    return opts.auto is not None or not opts.quant.is_float


def stage_plan(opts: ExportOptions, n_probes: int = NUM_PROBES) -> list[str]:
    """What the export will do, stage by stage (logged at the start)."""
    cfg, cal, cor = opts.quant, opts.calibration, opts.correction
    assert cfg is not None and opts.dtype is not None
    if cal.calib_from is not None:
        calib = f"calibration images from {cal.calib_from}"
    elif not _calibrates(opts):
        calib = "no calibration (float export)"
    elif cal.source in METHODS.names():
        calib = (f"synthesis {cal.source}: {cal.num_samples} images x {cal.iterations or 'default'} iterations"
                 + (f" ({cal.precision})" if cal.precision else ""))
    else:
        calib = f"calibration images: {cal.num_samples} from {cal.source}"
    plan = [calib]
    if opts.auto is not None:
        plan.append(f"search one format per unit ({opts.auto.budget}; {','.join(opts.auto.formats)})")
    plan.append(f"quantize {cfg.name}" if opts.auto is None else "quantize the mixed formats")
    if _calibrates(opts):
        plan += ["reparameterise"] * cor.reparam + [f"reconstruct ({cor.reconstruct_iters} steps a block)"] * \
            cor.reconstruct + [f"correct ({cor.mode})"] * (cor.mode != "none")
    plan += [f"export {opts.dtype.upper()} ONNX + lint", f"parity ({2 * cal.num_samples + n_probes} inputs)",
             f"data-free accuracy estimate ({NUM_ESTIMATE_PROBES} held-back probes)"]
    if opts.eval_data is not None:
        plan.append(f"accuracy on {opts.eval_data}" + (f" ({opts.eval_limit} images)" if opts.eval_limit else ""))
    return plan


def time_summary(timings: dict[str, float]) -> str:
    """One line: where the export's time went, largest first."""
    named = {k.removesuffix("_s").replace("_", " "): v for k, v in timings.items()}
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(named.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    return f"{sum(timings.values()):.0f} s in all: {parts}"


def precision_of(cfg: QuantConfig) -> str:
    """TensorRT precision name of a deployable quantized config (``fp4``, ``fp8``, ``int8`` or ``int4``: the most
    demanding format of its layers, as :mod:`dfq_deploy.trt.planner` reads the graph)."""
    formats = cfg.formats
    if "nvfp4" in formats:
        return "fp4"
    if "fp8" in formats:
        return "fp8"
    return "int8" if cfg.w_storage_bits == 8 else "int4"


def export_model(opts: ExportOptions) -> dict[str, Any]:
    """Run the export job and return its report (also written to ``OUTPUT/report.json``).

    Under ``torchrun`` a synthesis ``--calib`` runs on every rank (each synthesises its share of the images);
    rank 0 does everything else and returns the report, the other ranks return ``{"rank", "world_size"}``.

    Raises:
        DfqError: bad input, a TensorRT-rule violation, or failed parity; nothing is left in the output folder.
    """
    with removed_if_left_empty(opts.output):  # a failure or Ctrl-C leaves no empty folder behind
        return _export(opts)


def _export(opts: ExportOptions) -> dict[str, Any]:
    cfg, cal = opts.quant, opts.calibration
    assert cfg is not None and opts.dtype is not None
    out = Path(opts.output)
    check_inputs(opts)
    logger.info("export plan: %s", " -> ".join(stage_plan(opts)))
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    device = init_from_env(resolve_device(opts.device))  # under torchrun: this rank's device, in the group
    comm = current(device)
    synthesizes = _calibrates(opts) and cal.calib_from is None and cal.source in METHODS.names()
    if not comm.is_main and not synthesizes:  # only synthesis is shared out; the rest is rank 0's
        logger.info("rank %d: nothing to do (only a synthesis --calib runs on several processes)", comm.rank)
        return {"rank": comm.rank, "world_size": comm.world_size}
    model = create_model(opts.model).to(device)  # every PyTorch stage runs where the model is
    dcfg = data_config(model)
    if opts.eval_data is not None:  # its classes must be the model's: checked now, not after the calibration
        ImageFolder(opts.eval_data, class_names(model), getattr(model, "num_classes", None))
    timings["model_s"] = time.perf_counter() - t
    logger.info("PyTorch stages on %s", device)

    # Calibration set (a saved synth run, or a source run now), plus held-back inputs for parity: from the same
    # source with another seed when that is cheap (noise, real), Gaussian noise otherwise. A float export
    # calibrates nothing: it only needs parity inputs, so it does not run a synthesizer.
    t = time.perf_counter()
    source = cal.source if _calibrates(opts) else "noise"
    calib = calibration_set(model, replace(cal, source=source), opts.seed, opts.progress)
    if not comm.is_main:  # this rank synthesised its share of the images; rank 0 quantizes and exports
        return {"rank": comm.rank, "world_size": comm.world_size}
    held_source = source if source in CHEAP_SOURCES and cal.calib_from is None else "noise"
    held = get_source(held_source)(
        model, CalibRequest(len(calib), opts.seed + HELD_SEED_OFFSET, dcfg, cal.calib_dir))
    timings["calibration_data_s"] = time.perf_counter() - t

    mixed: dict[str, Any] | None = None
    if opts.auto is not None:
        t = time.perf_counter()
        cfg, mixed = auto_quant_config(model, calib.images, opts.auto, seed=opts.seed, progress=opts.progress)
        timings["search_s"] = time.perf_counter() - t
    # The data-free estimate: held-back synthetic probes through the float model now, the exported graph later.
    est_probes = estimate_probes(calib.images, seed=opts.seed)
    fp_est = probe_logits(model, est_probes)
    float_acc = None
    if mixed is not None and opts.eval_data is not None:
        float_acc = evaluate_torch(model, opts.eval_data, dcfg, opts.eval_limit, progress=opts.progress)
    correction = quantize_(model, cfg, calib.images, opts.correction, held=held.images, seed=opts.seed,
                           timings=timings)
    png = None
    if opts.plot and "stages" in correction:
        png = plot_block_errors(correction, title=f"{opts.model.name} {cfg.name}, correction {opts.correction.mode}")

    t = time.perf_counter()
    logger.info("export: %s ONNX graph, linted ...", opts.dtype.upper())
    proto = to_onnx(model, data_cfg=dcfg, dtype=opts.dtype, calib=calib.images)
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    probes = torch.cat([held.images, parity_probes(calib.images, seed=opts.seed)])
    parity = measure_parity(model, proto, {"calibration": calib.images, "held_back": probes}, opts.parity_threshold,
                            progress=opts.progress)
    timings["parity_s"] = time.perf_counter() - t
    require_parity(parity)
    if cfg.runs_in_ort:
        estimate = estimate_accuracy(fp_est, ort_logits(proto, est_probes), seed=opts.seed)
        estimate["measured_on"] = "onnxruntime (exported artifact) vs the float PyTorch model"
    else:  # no FP4 kernels in ONNX Runtime: the fake-quant model, labelled
        estimate = estimate_accuracy(fp_est, probe_logits(model, est_probes), seed=opts.seed)
        estimate["measured_on"] = "simulated (pytorch fake-quant; onnxruntime has no FP4 kernels) vs the float model"

    written: list[Path] = []
    try:
        onnx_path = save_onnx(proto, out / "model.onnx")
        written.append(onnx_path)
        report: dict[str, Any] = {
            "artifact": str(onnx_path),
            "model": opts.model.to_dict(),
            "data_config": dcfg,
            "quant_config": cfg.to_dict(),
            "precision": opts.dtype if cfg.is_float else precision_of(cfg),  # the integer type, if any
            "dtype": opts.dtype,
            "calibration": {"source": source, "num_samples": len(calib), "seed": opts.seed,
                            "dir": str(cal.calib_dir) if cal.calib_dir else None,
                            "from": str(cal.calib_from) if cal.calib_from else None,
                            "held_back_source": held_source, **calib.meta},
            "settings": opts.to_dict(),
            "correction": correction,
            "parity": parity,
            "estimate": estimate,
            "mixed": mixed,
            "lint": [str(v) for v in lint_onnx(proto)],
            "fp32_nodes": fp32_nodes(proto),  # an FP16 graph's FP32 islands and why (None: FP32 graph)
            "size_bytes": onnx_path.stat().st_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "versions": _versions(),
            "device": describe_device(device),
            "timings": timings,
        }
        if opts.eval_data is not None:
            t = time.perf_counter()
            if cfg.runs_in_ort:
                report["accuracy"] = evaluate_onnx(onnx_path, opts.eval_data, opts.eval_limit,
                                                   progress=opts.progress)
                report["accuracy"]["measured_on"] = "onnxruntime (exported artifact)"
            else:  # NVFP4: ONNX Runtime has no FP4 kernels (parity ran the graph in onnx.reference)
                report["accuracy"] = evaluate_torch(model, opts.eval_data, dcfg, opts.eval_limit,
                                                    progress=opts.progress)
                report["accuracy"]["measured_on"] = ("simulated (pytorch fake-quant; onnxruntime has no FP4 kernels, "
                                                     "the graph itself runs on TensorRT)")
            timings["eval_s"] = time.perf_counter() - t
            if mixed is not None and float_acc is not None:
                mixed["float_top1"] = float_acc["top1"]
                mixed["measured_top1"] = report["accuracy"]["top1"]
                mixed["measured_drop"] = 100 * (float_acc["top1"] - report["accuracy"]["top1"])
        if png is not None:
            written.append(atomic_write_bytes(out / "correction.png", png))
            correction["plot"] = "correction.png"
        atomic_write_json(out / "report.json", report)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    logger.info("time: %s; report: %s", time_summary(timings), out / "report.json")
    logger.info(describe(estimate))
    return report

