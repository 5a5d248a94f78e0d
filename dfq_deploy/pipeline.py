"""The ``export`` job, top to bottom: model -> calibration set -> [reparameterise] -> quantize -> [reconstruct]
-> [correct and fold] -> QDQ ONNX -> lint -> parity -> eval.

Nothing is written to the output folder until every check has passed; then ``model.onnx``, the optional
``correction.png`` and ``report.json`` are each written atomically (and removed again if a later step fails).
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfq_deploy.bench.accuracy import evaluate_onnx
from dfq_deploy.calib.correction import MODES, block_errors, fit_corrections_, plot_block_errors
from dfq_deploy.calib.fold import fold_corrections_
from dfq_deploy.calib.qmodel import batches_loop, quantize
from dfq_deploy.calib.reconstruct import reconstruct_
from dfq_deploy.calib.reparam import reparam_layernorm_
from dfq_deploy.calib.synth import METHODS, CalibRequest, get_source, load_synth_dir
from dfq_deploy.config import (
    DEFAULT_CALIB,
    DEFAULT_SYNTH_ITERS,
    DEVICE_CHOICES,
    GRAPH_DTYPES,
    SYNTH_PRECISIONS,
    QuantConfig,
    preset_for_bits,
)
from dfq_deploy.device import describe_device, resolve_device
from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import save_onnx, to_onnx
from dfq_deploy.export.parity import NUM_PROBES, measure_parity, parity_probes, require_parity
from dfq_deploy.models import ModelSpec, create_model, data_config, require_checkpoint_file
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

#: Calibration sources cheap enough to draw held-back parity inputs from.
CHEAP_SOURCES = ("noise", "real")


@dataclass
class ExportOptions:
    """Everything ``dfq-deploy export`` takes.

    Attributes:
        model: which model to build.
        bits: 8 (W8A8), 4 (W4A16), 3 (W3A16), 16 or 32 (float graphs in FP16 / FP32).
        dtype: the graph's compute type (:data:`dfq_deploy.config.GRAPH_DTYPES`): ``fp16``, what TensorRT should
            build, or ``fp32`` for CPU runtimes; None: the bit width's own, ``fp32`` for ``bits=32`` and ``fp16``
            otherwise.
        output: output folder (``model.onnx``, ``report.json``).
        calib: calibration source name (``noise``, ``real`` or a registered synthesizer).
        calib_from: a saved ``dfq-deploy synth`` output folder to calibrate with instead of running ``calib``.
        calib_dir: ImageFolder for ``real``.
        num_samples: calibration images.
        synth_iters: optimisation steps when ``calib`` is a data-free method (default
            :data:`DEFAULT_SYNTH_ITERS`); None: the method's own default.
        seed: RNG seed of the whole job.
        config: a full quantization config; overrides ``bits`` when given.
        parity_threshold: minimum fraction of parity inputs on which ONNX Runtime agrees with PyTorch within
            rounding (:mod:`dfq_deploy.export.parity`); 0 skips the check.
        eval_data: ImageFolder to measure the exported graph's accuracy on (optional).
        eval_limit: evaluate a seeded subset of this many images.
        progress: show progress bars.
        correct: closed-form correction of every quantized block Linear, fitted on the calibration set and
            folded into the weights (``none``, ``bias``, ``diag``, ``full``; see
            :mod:`dfq_deploy.calib.correction`).
        reparam: fold per-channel scales of post-LayerNorm activations into LayerNorms and Linears before
            calibration (only with quantized activations; :mod:`dfq_deploy.calib.reparam`).
        reconstruct: block-wise reconstruction by Adam before the correction (:mod:`dfq_deploy.calib.reconstruct`).
        reconstruct_iters: Adam steps per block.
        plot: write ``correction.png`` (per-block error before/after) beside ``report.json``.
        device: where the PyTorch stages run (synthesis, ranges, corrections, reconstruction, the PyTorch side
            of parity): ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``. ONNX export and
            ONNX Runtime run on the CPU.
        synth_precision: ``bf16`` autocast for the synthesis forward/backward, or ``fp32``; None: the method's
            default (:data:`dfq_deploy.config.SYNTH_PRECISIONS`).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    bits: int = 8
    dtype: str | None = None
    output: str | Path = "out"
    calib: str = DEFAULT_CALIB
    calib_dir: str | Path | None = None
    calib_from: str | Path | None = None
    num_samples: int = 32
    synth_iters: int | None = DEFAULT_SYNTH_ITERS
    seed: int = 0
    config: QuantConfig | None = None
    parity_threshold: float = 0.99
    eval_data: str | Path | None = None
    eval_limit: int | None = None
    progress: bool = True
    correct: str = "diag"
    reparam: bool = False
    reconstruct: bool = False
    reconstruct_iters: int = 100
    plot: bool = False
    device: str = DEVICE_CHOICES[0]
    synth_precision: str | None = None

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = preset_for_bits(self.bits)
        bits_dtype = {16: "fp16", 32: "fp32"}.get(self.bits) if self.config.w_bits is None else None
        if self.dtype is None:
            self.dtype = bits_dtype or GRAPH_DTYPES[0]
        if self.dtype not in GRAPH_DTYPES:
            raise DfqError(f"--dtype {self.dtype} is unknown: use one of {', '.join(GRAPH_DTYPES)}")
        if bits_dtype and self.dtype != bits_dtype:
            raise DfqError(f"--bits {self.bits} is the {bits_dtype} float graph: drop --dtype {self.dtype}")
        if not self.config.deployable:
            raise DfqError(f"{self.config.name} is simulated only (no TensorRT kernel): export a deployable preset")
        if self.synth_iters is not None and self.synth_iters < 1:
            raise DfqError(f"--synth-iters {self.synth_iters}: need at least 1 iteration")
        if self.num_samples < 1:
            raise DfqError(f"--num-samples {self.num_samples}: need at least 1 calibration image")
        if not 0.0 <= self.parity_threshold <= 1.0:
            raise DfqError(f"--parity-threshold {self.parity_threshold} must be between 0 and 1")
        if self.correct not in MODES:
            raise DfqError(f"--correct {self.correct} is unknown: use one of {', '.join(MODES)}")
        if self.reconstruct_iters < 1:
            raise DfqError(f"reconstruct_iters={self.reconstruct_iters}: need at least 1")
        if self.synth_precision is not None and self.synth_precision not in SYNTH_PRECISIONS:
            raise DfqError(f"--synth-dtype {self.synth_precision} is unknown: use one of {', '.join(SYNTH_PRECISIONS)}")


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
    from dfq_deploy.data import ImageFolder

    opts.model.timm_name  # noqa: B018 - raises on an unknown model name
    resolve_device(opts.device)  # --device cuda without a GPU fails here, not after the synthesis
    if opts.model.checkpoint is not None:
        require_checkpoint_file(opts.model.checkpoint)
    if opts.calib_from is not None:
        load_synth_dir(opts.calib_from)
    elif _calibrates(opts):
        get_source(opts.calib)
    if opts.calib_dir is not None and (opts.calib == "real" or opts.calib_from is None):
        ImageFolder(opts.calib_dir)
    if opts.eval_data is not None:
        ImageFolder(opts.eval_data)
    _check_writable(Path(opts.output))


def _calibrates(opts: ExportOptions) -> bool:
    assert opts.config is not None
    return opts.config.w_bits is not None or opts.config.a_bits is not None


def stage_plan(opts: ExportOptions, n_probes: int = NUM_PROBES) -> list[str]:
    """What the export will do, stage by stage (logged at the start)."""
    cfg = opts.config
    assert cfg is not None
    if opts.calib_from is not None:
        calib = f"calibration images from {opts.calib_from}"
    elif not _calibrates(opts):
        calib = "no calibration (float export)"
    elif opts.calib in METHODS.names():
        calib = f"synthesis {opts.calib}: {opts.num_samples} images x {opts.synth_iters or 'default'} iterations"
    else:
        calib = f"calibration images: {opts.num_samples} from {opts.calib}"
    plan = [calib, f"quantize {cfg.name}"]
    if _calibrates(opts):
        plan += ["reparameterise"] * opts.reparam + [f"reconstruct ({opts.reconstruct_iters} steps a block)"] * \
            opts.reconstruct + [f"correct ({opts.correct})"] * (opts.correct != "none")
    plan += [f"export {opts.dtype.upper()} ONNX + lint", f"parity ({2 * opts.num_samples + n_probes} inputs)"]
    if opts.eval_data is not None:
        plan.append(f"accuracy on {opts.eval_data}" + (f" ({opts.eval_limit} images)" if opts.eval_limit else ""))
    return plan


def time_summary(timings: dict[str, float]) -> str:
    """One line: where the export's time went, largest first."""
    named = {k.removesuffix("_s").replace("_", " "): v for k, v in timings.items()}
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(named.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    return f"{sum(timings.values()):.0f} s in all: {parts}"


def precision_of(cfg: QuantConfig) -> str:
    """TensorRT precision name of a deployable quantized config (``int8`` or ``int4``)."""
    return "int8" if cfg.w_storage_bits == 8 else "int4"


def export_model(opts: ExportOptions) -> dict[str, Any]:
    """Run the export job and return its report (also written to ``OUTPUT/report.json``).

    Raises:
        DfqError: bad input, a TensorRT-rule violation, or failed parity; nothing is left in the output folder.
    """
    cfg = opts.config
    assert cfg is not None
    out = Path(opts.output)
    check_inputs(opts)
    logger.info("export plan: %s", " -> ".join(stage_plan(opts)))
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    device = resolve_device(opts.device)
    model = create_model(opts.model).to(device)  # every PyTorch stage runs where the model is
    dcfg = data_config(model)
    timings["model_s"] = time.perf_counter() - t
    logger.info("PyTorch stages on %s", device)

    # Calibration set (a saved synth run, or a source run now), plus held-back inputs for parity: from the same
    # source with another seed when that is cheap (noise, real), Gaussian noise otherwise. A float export
    # calibrates nothing: it only needs parity inputs, so it does not run a synthesizer.
    t = time.perf_counter()
    source = opts.calib if _calibrates(opts) else "noise"
    if opts.calib_from is not None:
        calib = load_synth_dir(opts.calib_from, dcfg)
    else:
        options: dict[str, Any] = {}
        if source in METHODS.names():
            options["progress"] = opts.progress
            if opts.synth_iters is not None:
                options["iterations"] = opts.synth_iters
            if opts.synth_precision is not None:
                options["precision"] = opts.synth_precision
        calib = get_source(source)(model, CalibRequest(opts.num_samples, opts.seed, dcfg, opts.calib_dir, options))
    held_source = source if source in CHEAP_SOURCES and opts.calib_from is None else "noise"
    held = get_source(held_source)(
        model, CalibRequest(len(calib), opts.seed + 1_000_003, dcfg, opts.calib_dir))
    timings["calibration_data_s"] = time.perf_counter() - t

    correction = quantize_and_correct(model, cfg, calib.images, held.images, correct=opts.correct,
                                      reparam=opts.reparam, reconstruct=opts.reconstruct,
                                      reconstruct_iters=opts.reconstruct_iters, seed=opts.seed, timings=timings)
    png = None
    if opts.plot and "stages" in correction:
        png = plot_block_errors(correction, title=f"{opts.model.name} {cfg.name}, correction {opts.correct}")

    t = time.perf_counter()
    proto = to_onnx(model, data_cfg=dcfg, dtype=opts.dtype)
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    probes = torch.cat([held.images, parity_probes(calib.images, seed=opts.seed)])
    parity = measure_parity(model, proto, {"calibration": calib.images, "held_back": probes}, opts.parity_threshold)
    timings["parity_s"] = time.perf_counter() - t
    require_parity(parity)

    written: list[Path] = []
    try:
        onnx_path = save_onnx(proto, out / "model.onnx")
        written.append(onnx_path)
        report: dict[str, Any] = {
            "artifact": str(onnx_path),
            "model": opts.model.to_dict(),
            "data_config": dcfg,
            "quant_config": cfg.to_dict(),
            "precision": opts.dtype if cfg.w_bits is None else precision_of(cfg),  # the integer type, if any
            "dtype": opts.dtype,
            "calibration": {"source": source, "num_samples": len(calib), "seed": opts.seed,
                            "dir": str(opts.calib_dir) if opts.calib_dir else None,
                            "from": str(opts.calib_from) if opts.calib_from else None,
                            "held_back_source": held_source, **calib.meta},
            "correction": correction,
            "parity": parity,
            "lint": [str(v) for v in lint_onnx(proto)],
            "size_bytes": onnx_path.stat().st_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "versions": _versions(),
            "device": describe_device(device),
            "timings": timings,
        }
        if opts.eval_data is not None:
            t = time.perf_counter()
            report["accuracy"] = evaluate_onnx(onnx_path, opts.eval_data, opts.eval_limit, progress=opts.progress)
            report["accuracy"]["measured_on"] = "onnxruntime (exported artifact)"
            timings["eval_s"] = time.perf_counter() - t
        if png is not None:
            written.append(atomic_write_bytes(out / "correction.png", png))
            correction["plot"] = "correction.png"
        atomic_write_json(out / "report.json", report)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    logger.info("time: %s; report: %s", time_summary(timings), out / "report.json")
    return report


def quantize_and_correct(
    model: torch.nn.Module, cfg: QuantConfig, calib: torch.Tensor, held: torch.Tensor, *, correct: str = "diag",
    reparam: bool = False, reconstruct: bool = False, reconstruct_iters: int = 100, seed: int = 0,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Reparameterise, quantize, reconstruct and correct ``model`` in place.

    The export job and the accuracy benchmark both call this, so the benchmark measures what ships.

    Returns:
        The report's ``correction`` section: settings, per-block errors against the float model on the held-back
        inputs after each stage (``stages``), a before/after table (``blocks``), per-layer fits and timings.
    """
    timings = {} if timings is None else timings
    if cfg.w_bits is None and cfg.a_bits is None:
        t = time.perf_counter()
        quantize(model, cfg, batches_loop(calib))
        timings["quantize_s"] = time.perf_counter() - t
        return {"mode": "none", "skipped": "float export"}
    rep: dict[str, Any] = {"mode": correct, "reparam": False, "reconstruct": reconstruct,
                           "evaluated_on": f"held_back ({len(held)} inputs)", "stages": {}}
    stage_s: dict[str, float] = {}
    t = time.perf_counter()
    if reparam and cfg.a_bits is not None:
        layers = reparam_layernorm_(model, calib)["layers"]
        rep["reparam"] = True
        rep["reparam_range_ratio"] = {
            "before": max((v["range_ratio_before"] for v in layers.values()), default=None),
            "after": max((v["range_ratio_after"] for v in layers.values()), default=None),
        }
        stage_s["reparam_s"] = time.perf_counter() - t
    elif reparam:
        logger.info("reparam: %s has float activations, nothing to reparameterise", cfg.name)
    fp_model = copy.deepcopy(model)
    t = time.perf_counter()
    quantize(model, cfg, batches_loop(calib))
    timings["quantize_s"] = time.perf_counter() - t
    stage_s["quantize_s"] = timings["quantize_s"]

    def measure(stage: str) -> None:
        t = time.perf_counter()
        rep["stages"][stage] = block_errors(model, fp_model, held)
        stage_s[f"errors_{stage}_s"] = time.perf_counter() - t

    measure("quantized")
    if reconstruct:
        t = time.perf_counter()
        rec = reconstruct_(model, fp_model, calib, iters=reconstruct_iters, seed=seed)
        stage_s["reconstruct_s"] = time.perf_counter() - t
        rep["reconstruction"] = rec
        measure("reconstructed")
    if correct != "none":
        t = time.perf_counter()
        fit = fit_corrections_(model, fp_model, calib, correct, seed=seed)
        stage_s["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        fold_corrections_(model)
        stage_s["fold_s"] = time.perf_counter() - t
        rep["layers"] = fit["layers"]
        measure("corrected")
    first, last = rep["stages"]["quantized"], list(rep["stages"].values())[-1]
    rep["blocks"] = [
        {"block": i, **{f"{k}_before": b[k] for k in ("mse", "nmse", "cos")},
         **{f"{k}_after": a[k] for k in ("mse", "nmse", "cos")}}
        for i, (b, a) in enumerate(zip(first["blocks"], last["blocks"], strict=True))
    ]
    rep["logits"] = {"before": first["logits"], "after": last["logits"]}
    rep["timings"] = stage_s
    timings["correction_s"] = sum(v for k, v in stage_s.items() if k != "quantize_s")
    logger.info("correction %s: held-back logits nmse %.3g -> %.3g", correct, first["logits"]["nmse"],
                last["logits"]["nmse"])
    return rep
