"""The ``export`` job, top to bottom: model -> calibration set -> quantize -> QDQ ONNX -> lint -> parity -> eval.

Nothing is written to the output folder until every check has passed; then ``model.onnx`` and ``report.json``
are each written atomically.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfq_deploy.bench.accuracy import DATA_CONFIG_KEY, evaluate_onnx
from dfq_deploy.calib.qmodel import batches_loop, quantize
from dfq_deploy.calib.synth import CalibRequest, get_source
from dfq_deploy.config import QuantConfig, preset_for_bits
from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import save_onnx, to_onnx
from dfq_deploy.export.parity import measure_parity, require_parity
from dfq_deploy.models import ModelSpec, create_model, data_config
from dfq_deploy.utils import atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """Everything ``dfq-deploy export`` takes.

    Attributes:
        model: which model to build.
        bits: 8 (W8A8), 4 (W4A16), 3 (W3A16), 16 or 32 (float reference graphs).
        output: output folder (``model.onnx``, ``report.json``).
        calib: calibration source name (``noise``, ``real`` or a registered synthesizer).
        calib_dir: ImageFolder for ``real``.
        num_samples: calibration images.
        seed: RNG seed of the whole job.
        config: a full quantization config; overrides ``bits`` when given.
        parity_threshold: minimum ORT-vs-PyTorch top-1 agreement.
        eval_data: ImageFolder to measure the exported graph's accuracy on (optional).
        eval_limit: evaluate a seeded subset of this many images.
        progress: show progress bars.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    bits: int = 8
    output: str | Path = "out"
    calib: str = "noise"
    calib_dir: str | Path | None = None
    num_samples: int = 32
    seed: int = 0
    config: QuantConfig | None = None
    parity_threshold: float = 0.99
    eval_data: str | Path | None = None
    eval_limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = preset_for_bits(self.bits)
        if not self.config.deployable:
            raise DfqError(f"{self.config.name} is simulated only (no TensorRT kernel): export a deployable preset")
        if self.num_samples < 1:
            raise DfqError(f"--num-samples {self.num_samples}: need at least 1 calibration image")
        if not 0.0 <= self.parity_threshold <= 1.0:
            raise DfqError(f"--parity-threshold {self.parity_threshold} must be between 0 and 1")


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


def precision_of(cfg: QuantConfig) -> str:
    """TensorRT precision name of a deployable config (``fp32``, ``int8`` or ``int4``)."""
    if cfg.w_bits is None:
        return "fp32"
    return "int8" if cfg.w_storage_bits == 8 else "int4"


def export_model(opts: ExportOptions) -> dict[str, Any]:
    """Run the export job and return its report (also written to ``OUTPUT/report.json``).

    Raises:
        DfqError: bad input, a TensorRT-rule violation, or failed parity; nothing is left in the output folder.
    """
    cfg = opts.config
    assert cfg is not None
    out = Path(opts.output)
    _check_writable(out)
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model = create_model(opts.model)
    dcfg = data_config(model)
    timings["model_s"] = time.perf_counter() - t

    # Calibration set, plus as many held-back inputs from the same source (with another seed) for parity.
    t = time.perf_counter()
    source = get_source(opts.calib)
    req = CalibRequest(opts.num_samples, opts.seed, dcfg, opts.calib_dir)
    calib = source(model, req)
    held = source(model, CalibRequest(opts.num_samples, opts.seed + 1_000_003, dcfg, opts.calib_dir))
    timings["calibration_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    quantize(model, cfg, batches_loop(calib.images))
    timings["quantize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    proto = to_onnx(model, tuple(dcfg["input_size"]))
    meta = proto.metadata_props.add()
    meta.key, meta.value = DATA_CONFIG_KEY, json.dumps({k: dcfg[k] for k in dcfg})
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    parity = measure_parity(model, proto, {"calibration": calib.images, "held_back": held.images},
                            opts.parity_threshold)
    timings["parity_s"] = time.perf_counter() - t
    require_parity(parity)

    onnx_path = save_onnx(proto, out / "model.onnx")
    report: dict[str, Any] = {
        "artifact": str(onnx_path),
        "model": opts.model.to_dict(),
        "data_config": dcfg,
        "quant_config": cfg.to_dict(),
        "precision": "fp16" if opts.bits == 16 and cfg.w_bits is None else precision_of(cfg),
        "calibration": {"source": opts.calib, "num_samples": len(calib), "seed": opts.seed,
                        "dir": str(opts.calib_dir) if opts.calib_dir else None, **calib.meta},
        "parity": parity,
        "lint": [str(v) for v in lint_onnx(proto)],
        "size_bytes": onnx_path.stat().st_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "versions": _versions(),
        "timings": timings,
    }
    if opts.eval_data is not None:
        t = time.perf_counter()
        try:
            report["accuracy"] = evaluate_onnx(onnx_path, opts.eval_data, opts.eval_limit, progress=opts.progress)
        except BaseException:
            onnx_path.unlink(missing_ok=True)
            raise
        report["accuracy"]["measured_on"] = "onnxruntime (exported artifact)"
        timings["eval_s"] = time.perf_counter() - t
    atomic_write_json(out / "report.json", report)
    logger.info("report: %s", out / "report.json")
    return report
