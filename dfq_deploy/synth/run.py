"""Run a synthesizer into an output folder, and read such a folder back (``dfq-deploy synth`` / ``--calib-from``).

A finished folder holds:

==========================  ===========================================================================
``images.safetensors``      ``images`` float32 ``[N, 3, H, W]`` (normalised space), ``targets`` float32
                            ``[N, classes]`` (one-hot or soft)
``config.json``             method, resolved options, seed, iterations, the model's data config, stage
                            schedule, timing; written last, so its presence marks a finished run
``loss.json``               every loss term per iteration (columns, weighted as summed into ``total``),
                            with stage and learning rate
``contact_sheet.png``       the first (up to 64) images, de-normalised, in a grid
``loss.png``                the loss curves (needs matplotlib; skipped with a warning without it)
``checkpoint.pt``           the resumable state (see :mod:`~dfq_deploy.synth.loop`); with several
                            processes one ``checkpoint.rank<r>-of-<W>.it<k>.pt`` per rank instead
==========================  ===========================================================================

Every file is written atomically (temp file + rename). Under ``torchrun`` rank 0 writes the folder; the
other ranks write only their checkpoint files.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq_deploy.calib_images import CALIB_IMAGES_FILE, read_calib_images
from dfq_deploy.config import CalibrationConfig
from dfq_deploy.device import model_device
from dfq_deploy.errors import DfqError
from dfq_deploy.models import data_config
from dfq_deploy.synth.base import CalibRequest, CalibSet, get_source
from dfq_deploy.synth.checkpoint import checkpoint_files, jsonable_cfg, load_checkpoint, shard_checkpoint_path
from dfq_deploy.synth.distributed import CollectiveError, current, local_device
from dfq_deploy.synth.loop import SynthResult, synthesize
from dfq_deploy.synth.method import METHODS, method_options
from dfq_deploy.synth.options import SynthOptions
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, figure_png, removed_if_left_empty

logger = logging.getLogger(__name__)

IMAGES_FILE = CALIB_IMAGES_FILE
CONFIG_FILE = "config.json"
LOSS_FILE = "loss.json"
SHEET_FILE = "contact_sheet.png"
PLOT_FILE = "loss.png"
CHECKPOINT_FILE = "checkpoint.pt"
SYNTH_FORMAT = "dfq-synth"
SYNTH_VERSION = 1
SHEET_MAX_IMAGES = 64


def synthesize_to_dir(
    model: nn.Module,
    data_cfg: dict[str, Any],
    method: str,
    num_samples: int = 32,
    iters: int | None = None,
    output_dir: str | Path = "synth",
    seed: int = 0,
    resume: bool = False,
    options: dict[str, Any] | SynthOptions | None = None,
    progress: bool = True,
    checkpoint_every: int = 200,
    stop_after: int | None = None,
    model_info: dict[str, Any] | None = None,
) -> CalibSet:
    """Synthesise ``num_samples`` calibration images with ``method`` and save them in ``output_dir``.

    Args:
        model: full-precision timm ViT/DeiT/Swin (left as it was found).
        data_cfg: its timm data config (``dfq_deploy.models.data_config(model)``).
        method: ``psaq``, ``spdfq`` or ``dfqvit`` (any registered synthesis method).
        num_samples: images to synthesise.
        iters: optimisation iterations; None: the method's default.
        output_dir: the output folder (created).
        seed: seed of every random draw.
        resume: continue from ``output_dir/checkpoint.pt`` (same method, settings, seed and model), or
            start afresh if there is none; the result equals an uninterrupted run.
        options: further method options (dict or options object), e.g. ``{"alpha1": 1e4}``.
        progress: show a progress bar on stderr.
        checkpoint_every: checkpoint period in iterations (also written at the end).
        stop_after: stop after this many iterations in this call (checkpointed; finish later with ``resume``).
        model_info: what to record about the model in ``config.json`` (e.g. ``ModelSpec.to_dict()``).

    Returns:
        The images and targets; ``meta["complete"]`` is False when stopped early by ``stop_after``.

    Raises:
        DfqError: bad options or model, ``output_dir`` already holds a run (without ``resume``), a checkpoint
            that does not match, or a NaN/inf loss term.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DfqError(f"--output {out} is a file: choose a folder")
    ckpt = out / CHECKPOINT_FILE
    comm = current(local_device(model_device(model)))
    held = bool(checkpoint_files(ckpt)) or (out / CONFIG_FILE).exists() or (out / IMAGES_FILE).exists()
    if not resume and comm.any(held):  # decided together, before any rank writes its checkpoint
        raise CollectiveError(
            f"{out} already holds a synthesis run: pass --resume to continue or re-finish it, "
            "or choose an empty --output folder"
        )
    opts = method_options(method, options, num_samples=num_samples, seed=seed, iterations=iters)
    with removed_if_left_empty(out):  # stopped before its first checkpoint: no empty folder left behind
        res = synthesize(model, data_cfg, method, opts, checkpoint_path=ckpt, resume=resume,
                         checkpoint_every=checkpoint_every, progress=progress, stop_after=stop_after)
    calib = res.to_calib_set()
    calib.meta.update(complete=res.complete, dir=str(out))
    if not res.complete:
        logger.info(
            "%s stopped at iteration %d/%d: continue with --resume (checkpoint %s)",
            method,
            res.iteration,
            res.options.iterations,
            ckpt,
        )
        return calib
    if comm.is_main:  # the other ranks wrote their checkpoints and nothing else
        write_outputs(out, res, data_cfg, model_info)
    comm.barrier()
    return calib


def write_outputs(out: Path, res: SynthResult, data_cfg: dict[str, Any], model_info: dict[str, Any] | None) -> None:
    """Write images, loss history, pictures and (last) ``config.json`` of a finished run into ``out``."""
    from safetensors.torch import save as st_save

    images = res.images.float().contiguous()
    targets = res.targets.float().contiguous()
    meta = {"format": SYNTH_FORMAT, "version": str(SYNTH_VERSION), "method": res.method}
    atomic_write_bytes(out / IMAGES_FILE, st_save({"images": images, "targets": targets}, metadata=meta))
    atomic_write_json(out / LOSS_FILE, loss_table(res.history, res.method))
    write_contact_sheet(images, data_cfg, out / SHEET_FILE)
    write_loss_plot(res.history, out / PLOT_FILE, title=f"{res.method} ({res.options.num_samples} images)")
    import timm

    from dfq_deploy import __version__

    config = {
        "format": SYNTH_FORMAT,
        "version": SYNTH_VERSION,
        "method": res.method,
        "num_samples": res.options.num_samples,
        "seed": res.options.seed,
        "iterations": res.iteration,
        "num_classes": int(targets.shape[1]),
        "options": res.options.to_dict(),
        "info": res.info,
        "data_config": jsonable_cfg(data_cfg),
        "model": model_info,
        "model_fingerprint": res.fingerprint,
        "final_loss": {k: v for k, v in res.history[-1].items() if k != "stage"} if res.history else None,
        "timing": {
            "seconds_this_call": round(res.seconds, 3),
            "iterations_this_call": res.iterations_run,
            "seconds_per_iteration": res.seconds_per_iteration,
            "device": res.device,
            "peak_memory_bytes": res.peak_memory_bytes,
            "processes": res.world_size,
            "backend": res.backend,
        },
        "versions": {"dfq_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "files": {"images": IMAGES_FILE, "loss": LOSS_FILE, "contact_sheet": SHEET_FILE,
                  "checkpoint": shard_checkpoint_path(CHECKPOINT_FILE, "*", res.world_size, res.iteration).name},
    }
    atomic_write_json(out / CONFIG_FILE, config)
    logger.info("wrote %d %s images to %s", len(images), res.method, out)


def loss_table(history: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Column-wise loss history: ``iteration``, ``stage``, ``lr`` and ``terms`` (term -> values, null where a
    stage lacks that term)."""
    keys: list[str] = []
    for rec in history:
        for k in rec:
            if k not in ("iteration", "stage", "lr") and k not in keys:
                keys.append(k)
    return {
        "method": method,
        "weighted": True,  # each term as it enters the total (weight x raw value)
        "iteration": [r["iteration"] for r in history],
        "stage": [r["stage"] for r in history],
        "lr": [r["lr"] for r in history],
        "terms": {k: [r.get(k) for r in history] for k in keys},
    }


def denormalize(images: torch.Tensor, data_cfg: dict[str, Any]) -> torch.Tensor:
    """Normalised images back to ``[0, 1]`` pixels (clamped)."""
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)


def write_contact_sheet(images: torch.Tensor, data_cfg: dict[str, Any], path: str | Path, pad: int = 2) -> Path:
    """Save the first (up to 64) images as a PNG grid, small images enlarged to at least 64 px."""
    from PIL import Image

    shown = images[:SHEET_MAX_IMAGES]
    pix = (denormalize(shown, data_cfg) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, c = pix.shape
    scale = max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        tile = pix[i] if c == 3 else np.repeat(pix[i][..., :1], 3, axis=-1)
        if scale > 1:
            tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        sheet[y : y + h, x : x + w] = tile
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def write_loss_plot(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Plot every loss term against the iteration (one panel each); None if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'dfq-deploy[plot]')", path)
        return None
    table = loss_table(history, "")
    terms = table["terms"]
    its = table["iteration"]
    fig = Figure(figsize=(7, 1.6 * max(1, len(terms)) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(terms) or 1, 1, sharex=True, squeeze=False)[:, 0]
    changes = [its[i] for i in range(1, len(its)) if table["stage"][i] != table["stage"][i - 1]]
    for ax, (name, values) in zip(axes, terms.items(), strict=False):
        pts = [(i, v) for i, v in zip(its, values, strict=True) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5 if name == "total" else 1.0)
        for x in changes:
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig, dpi=100))


def load_synth_dir(path: str | Path, data_cfg: dict[str, Any] | None = None) -> CalibSet:
    """Read the images of a finished ``dfq-deploy synth`` folder (for ``--calib-from DIR``).

    Args:
        path: the folder.
        data_cfg: the model's data config; when given, the images' size, mean and std must match it.

    Raises:
        DfqError: missing folder or files, unfinished run, corrupt or inconsistent files, or images made for
            another input size / normalisation.
    """
    d = Path(path)
    if not d.is_dir():
        raise DfqError(f"synthesis folder {d} does not exist: make one with `dfq-deploy synth --output {d}`")
    img_file, cfg_file = d / IMAGES_FILE, d / CONFIG_FILE
    if not img_file.is_file() or not cfg_file.is_file():
        ckpts = checkpoint_files(d / CHECKPOINT_FILE)
        if ckpts:
            try:
                state = load_checkpoint(ckpts[0])
                where = f" (iteration {state['iteration']}/{state['total']}, method {state['method']})"
            except DfqError:
                where = ""
            raise DfqError(
                f"synthesis in {d} has not finished{where}: finish it with `dfq-deploy synth ... --output {d} --resume`"
            )
        missing = IMAGES_FILE if not img_file.is_file() else CONFIG_FILE
        raise DfqError(f"{d} is not a finished synthesis folder: {missing} is missing (run `dfq-deploy synth`)")
    try:
        config = json.loads(cfg_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DfqError(f"{cfg_file} is corrupt ({exc}): re-run `dfq-deploy synth`") from exc
    if config.get("format") != SYNTH_FORMAT:
        raise DfqError(f"{cfg_file} is not a dfq-deploy synthesis config")
    arr, tgt = read_calib_images(img_file, fix="re-run `dfq-deploy synth`")  # the one reader of saved images
    images = torch.from_numpy(arr)
    targets = None if tgt is None else torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.float32))
    if targets is not None and (targets.ndim != 2 or len(targets) != len(images)):
        raise DfqError(f"{img_file}: 'targets' {tuple(targets.shape)} does not match {len(images)} images")
    if data_cfg is not None:
        _check_matches(d, images, config.get("data_config", {}), data_cfg)
    meta = {
        "source": "synth-dir",
        "dir": str(d),
        "method": config.get("method"),
        "seed": config.get("seed"),
        "iterations": config.get("iterations"),
        "options": config.get("options"),
    }
    return CalibSet(images.float(), None if targets is None else targets.float(), meta=meta)


def _check_matches(d: Path, images: torch.Tensor, saved: dict[str, Any], data_cfg: dict[str, Any]) -> None:
    want = tuple(int(v) for v in data_cfg["input_size"])
    if tuple(images.shape[1:]) != want:
        raise DfqError(
            f"images in {d} are {tuple(images.shape[1:])}, the model takes {want}: synthesise for this model"
        )
    for key in ("mean", "std"):
        if key in saved and not np.allclose(saved[key], data_cfg[key], atol=1e-6):
            raise DfqError(
                f"images in {d} were normalised with {key}={saved[key]}, the model uses {list(data_cfg[key])}: "
                "synthesise for this model"
            )


def synthesize_default(spec: Any, output_dir: str | Path, num_samples: int = 32, iters: int | None = None,
                       progress: bool = True, device: str = "auto") -> Path:
    """The export's default data-free calibration set of a model, saved (resumably) for ``--calib-from``.

    Builds ``spec`` (a :class:`dfq_deploy.models.ModelSpec`) after seeding 0, as ``export`` does, and runs
    :data:`dfq_deploy.config.DEFAULT_CALIB` with seed 0 into ``output_dir``.

    Args:
        spec: the model.
        output_dir: the synth folder (resumed when it holds a checkpoint of the same run).
        num_samples: images.
        iters: iterations (default :data:`dfq_deploy.config.DEFAULT_SYNTH_ITERS`).
        progress: show the progress bar.
        device: where to synthesise (``auto``: CUDA when torch sees a GPU).
    """
    from dfq_deploy.config import DEFAULT_CALIB, DEFAULT_SYNTH_ITERS
    from dfq_deploy.device import resolve_device
    from dfq_deploy.models import create_model

    torch.manual_seed(0)  # random-weight models: the same weights as the export job builds
    model = create_model(spec).to(resolve_device(device))
    synthesize_to_dir(model, data_config(model), DEFAULT_CALIB, num_samples=num_samples,
                  iters=iters or DEFAULT_SYNTH_ITERS, output_dir=output_dir, seed=0, resume=True, progress=progress,
                  model_info=spec.to_dict())
    return Path(output_dir)



def calibration_set(model: nn.Module, calibration: CalibrationConfig | None = None, seed: int = 0,
                    progress: bool = True) -> CalibSet:
    """The calibration images a :class:`~dfq_deploy.config.CalibrationConfig` asks for, as ``export`` makes them.

    A saved ``dfq-deploy synth`` folder (``calib_from``) is read back; otherwise ``source`` runs now: a data-free
    method (``dfqvit`` by default, ``iterations`` steps), ``noise``, or ``real`` images from ``calib_dir``.

    Example::

        from dfq_deploy import CalibrationConfig, ModelSpec, calibration_set, create_model
        model = create_model(ModelSpec("deit_tiny_cifar10"))
        images = calibration_set(model, CalibrationConfig(num_samples=32, iterations=200)).images

    Args:
        model: the float model (its device runs the synthesis).
        calibration: a :class:`~dfq_deploy.config.CalibrationConfig` (None: the defaults).
        seed: the seed of the images.
        progress: a progress bar for the synthesis.

    Returns:
        a :class:`CalibSet`: ``images`` ``[N, C, H, W]`` in the model's normalised space (CPU), and ``meta``.
    """
    cal = CalibrationConfig() if calibration is None else calibration
    dcfg = data_config(model)
    if cal.calib_from is not None:
        return load_synth_dir(cal.calib_from, dcfg)
    options: dict[str, Any] = {}
    if cal.source in METHODS.names():
        options["progress"] = progress
        if cal.iterations is not None:
            options["iterations"] = cal.iterations
        if cal.precision is not None:
            options["precision"] = cal.precision
    return get_source(cal.source)(model, CalibRequest(cal.num_samples, seed, dcfg, cal.calib_dir, options))
