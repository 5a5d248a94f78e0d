"""The optimisation loop shared by every data-free synthesizer (PSAQ-ViT, SPDFQ, DFQ-ViT).

A method (a :class:`SynthMethod` subclass registered with :func:`synth_method`) supplies its loss terms and
its own random targets; this module does everything else, once:

* **Images** start as standard Gaussian noise in the model's normalised space and are optimised directly with
  Adam (betas 0.5, 0.9; lr 0.2, 0.25 for Swin) under a cosine schedule with a short linear warm-up, as in
  PSAQ-ViT's and DeepInversion's public code. A method may re-parameterise the images (DFQ-ViT optimises a
  low-resolution image first) and split the run into named stages, each of which may restart the schedule.
* **Augmentation** every step (DeepInversion): a random ``torch.roll`` jitter of up to ``jitter`` pixels in
  each direction and a random horizontal flip of the whole batch.
* **Priors**: pixels are clipped after every step to the valid normalised range
  ``(0 - mean) / std .. (1 - mean) / std`` per channel, and a total-variation (TV) prior is added to the loss.
* **Model**: eval mode, fused attention off, parameters frozen (``requires_grad=False``); all three are
  restored afterwards, also when synthesis fails.
* **Bookkeeping**: a tqdm progress bar (iteration, loss terms, images/s), a per-iteration history of every
  loss term, and atomic checkpoints every ``checkpoint_every`` iterations and at the end. A checkpoint holds
  the images, Adam's state, the iteration, the method's random targets/priors, the loss history and the
  states of the two ``torch.Generator`` objects that make all random draws (no global RNG, no numpy or Python
  ``random``), so a resumed run reproduces an uninterrupted one bit for bit on the same machine.
* **Failure**: a NaN or inf loss term stops the run with a :class:`DfqError` naming the term; the last good
  checkpoint is left untouched.

Losses are means over images, so ``batch_size`` (micro-batching, to bound memory) only changes the floating
point summation order, not the objective.
"""


from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq_deploy.device import (
    describe_device,
    model_device,
    peak_memory_bytes,
    peak_memory_reset,
    resolve_device,
    synthesis_numerics,
)
from dfq_deploy.errors import DfqError
from dfq_deploy.synth.base import CalibSet
from dfq_deploy.synth.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_resumable,
    jsonable_cfg,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from dfq_deploy.synth.method import SynthMethod, get_method, method_options, synthesis_mode
from dfq_deploy.synth.options import LR_VIT, SynthOptions
from dfq_deploy.synth.priors import total_variation, valid_range
from dfq_deploy.synth.schedule import lr_at, stage_at

logger = logging.getLogger(__name__)


#: Bump when the images a synthesizer makes for given options change (benchmark caches key on it). It started at
#: the package version it was split from.
SYNTH_REVISION = "0.1.0"


@dataclass
class SynthResult:
    """What :func:`synthesize` returns.

    Attributes:
        images: ``[N, C, H, W]`` float32 images in normalised space.
        targets: ``[N, classes]`` float32 one-hot or soft targets.
        history: per-iteration dicts: ``iteration`` (1-based), ``stage``, ``lr``, ``total`` and each term.
        iteration: iterations completed so far (equals ``options.iterations`` when ``complete``).
        complete: all iterations ran (False when stopped early with ``stop_after``).
        method: method name.
        options: resolved options.
        info: :meth:`SynthMethod.describe` (stages, per-model settings).
        seconds: wall time of this call's iterations.
        iterations_run: iterations run by this call (fewer than ``iteration`` after a resume).
        fingerprint: :func:`model_fingerprint` of the model.
        device: where it ran (:func:`dfq_deploy.device.describe_device`).
        peak_memory_bytes: peak memory torch allocated on a CUDA device during the run (None on the CPU).
    """

    images: torch.Tensor
    targets: torch.Tensor
    history: list[dict[str, Any]]
    iteration: int
    complete: bool
    method: str
    options: SynthOptions
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    iterations_run: int = 0
    fingerprint: str = ""
    device: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None

    @property
    def seconds_per_iteration(self) -> float | None:
        return self.seconds / self.iterations_run if self.iterations_run else None

    def to_calib_set(self) -> CalibSet:
        meta = {
            "source": self.method,
            "seed": self.options.seed,
            "iterations": self.iteration,
            "options": self.options.to_dict(),
            "final_loss": self.history[-1]["total"] if self.history else None,
        }
        return CalibSet(self.images, self.targets, meta=meta)


def synthesize(
    model: nn.Module,
    data_cfg: dict[str, Any],
    method: str,
    options: SynthOptions | dict[str, Any] | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
) -> SynthResult:
    """Synthesise calibration images with a registered method.

    The work runs on the model's device, or on ``device`` (the model is moved there and back). Random draws
    are made on the CPU, so a seed gives the same starting images and targets on every device; the result
    and the checkpoints are CPU tensors.

    Args:
        model: full-precision timm ViT/DeiT/Swin (its mode, fused-attention flags and ``requires_grad`` flags
            are restored afterwards).
        data_cfg: the model's timm data config.
        method: registered method name (``psaq``, ``spdfq``, ``dfqvit``).
        options: the method's options object or a dict for it.
        checkpoint_path: where to write checkpoints; None writes none.
        resume: continue from ``checkpoint_path`` if it exists (options, model and seed must match).
        checkpoint_every: checkpoint period in iterations (and always at the end); 0 only at the end.
        progress: show a tqdm progress bar on stderr.
        stop_after: run at most this many iterations in this call, then checkpoint and return an incomplete
            result (for time-sliced jobs; resume later to finish).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or a ``torch.device``; None: where the model is.

    Raises:
        DfqError: bad options, unsuitable model, checkpoint mismatch, or a NaN/inf loss term.
    """
    cls = get_method(method)
    opts = options if isinstance(options, cls.Options) else method_options(method, options)  # type: ignore[arg-type]
    if checkpoint_every < 0:
        raise DfqError(f"checkpoint_every={checkpoint_every} must be >= 0")
    if stop_after is not None and stop_after < 0:
        raise DfqError(f"stop_after={stop_after} must be >= 0")
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and opts.precision is None and ckpt_path is not None and ckpt_path.is_file():
        # the run goes on in the precision it started with, on whichever device it resumes
        saved = load_checkpoint(ckpt_path).get("options", {})
        opts = opts.with_(precision=saved.get("precision", opts.replay_defaults.get("precision")))
    home = model_device(model)
    target = home if device is None else resolve_device(device)
    if target != home:
        model.to(target)
    try:
        with synthesis_mode(model):
            m = cls(model, data_cfg, opts)
            return _optimise(m, ckpt_path, resume, checkpoint_every, progress, stop_after)
    finally:
        if target != home:
            model.to(home)


def _optimise(
    m: SynthMethod,
    ckpt_path: Path | None,
    resume: bool,
    checkpoint_every: int,
    progress: bool,
    stop_after: int | None,
) -> SynthResult:
    from tqdm.auto import tqdm

    opts = m.opts
    name = m.name
    total = opts.iterations
    n = opts.num_samples
    stages = m.stages()
    fingerprint = model_fingerprint(m.model)
    gen_init = torch.Generator().manual_seed(opts.seed)
    gen_step = torch.Generator()
    history: list[dict[str, Any]] = []

    ckpt = None
    if resume and ckpt_path is not None:
        if ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path)
            check_resumable(ckpt, m, fingerprint, ckpt_path)
        else:
            logger.warning("no checkpoint at %s: starting from iteration 0", ckpt_path)
    device = m.device
    if ckpt is None:
        params = m.init_params(gen_init).to(device)  # drawn on the CPU: the same images on every device
        m.init_state(gen_init)
        gen_step.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen_init)))
        start = 0
    else:
        params = ckpt["params"].to(device, copy=True)
        m.state = {k: v.clone() for k, v in ckpt["state"].items()}
        gen_init.set_state(ckpt["rng"]["init"])
        gen_step.set_state(ckpt["rng"]["step"])
        history = list(ckpt["history"])
        start = int(ckpt["iteration"])
        logger.info("resuming %s from iteration %d/%d (%s)", name, start, total, ckpt_path)
    params.requires_grad_(True)
    optimizer = _adam(params, opts)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device

    lo, hi = (t.to(device) for t in valid_range(m.data_cfg))
    last_saved = start if ckpt is not None else None

    def save(it_done: int) -> None:
        nonlocal last_saved
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "method": name,
                "options": opts.to_dict(),
                "iteration": it_done,
                "total": total,
                "params": params.detach().cpu().clone(),  # checkpoints are CPU tensors: resumable anywhere
                "optimizer": _to_cpu(optimizer.state_dict()),
                "state": {k: v.detach().cpu().clone() for k, v in m.state.items()},
                "history": history,
                "rng": {"init": gen_init.get_state(), "step": gen_step.get_state()},
                "model_fingerprint": fingerprint,
                "data_cfg": jsonable_cfg(m.data_cfg),
            },
        )
        last_saved = it_done
        logger.debug("checkpoint at iteration %d -> %s", it_done, ckpt_path)

    it = start
    ran = 0
    chunk = opts.batch_size  # images per forward/backward pass (None: all); halved on CUDA out-of-memory
    peak_memory_reset(device)
    t_start = time.perf_counter()
    bar = tqdm(total=total, initial=start, disable=not progress, desc=f"synth {name}", unit="it", dynamic_ncols=True)
    try:
        with m.taps():
            while it < total and (stop_after is None or ran < stop_after):
                t0 = time.perf_counter()
                stage = stage_at(stages, it)
                new = m.adapt_params(it, stage, params.detach())
                if new is not None:
                    params = new.detach().clone().requires_grad_(True)
                    optimizer = _adam(params, opts)
                lr = lr_at(stages, it, opts.lr, opts.warmup)  # type: ignore[arg-type]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                shift, flip = _draw_augmentation(gen_step, opts)
                ctx = m.step_context(it, stage, params, gen_step)
                ctx["augment"] = (shift, flip)
                while True:  # one step; on CUDA out-of-memory, again in half-size chunks (chunks are exact)
                    optimizer.zero_grad(set_to_none=True)
                    sums: dict[str, float] = {}
                    try:
                        for idx in _chunks(n, chunk):
                            frac = (idx.stop - idx.start) / n
                            with synthesis_numerics(device, opts.precision):
                                clean = m.render(params[idx], stage)
                                views = _augment(clean, shift, flip)
                                terms = m.losses(clean, views, idx, it, stage, ctx)
                                w_tv = m.tv_weight(stage)
                                if w_tv:
                                    terms["tv"] = w_tv * total_variation(clean)
                            values = {k: float(v.detach()) for k, v in terms.items()}
                            _check_finite(values, name, it, ckpt_path, last_saved)
                            (sum(terms.values()) * frac).backward()  # type: ignore[union-attr]
                            for k, v in values.items():
                                sums[k] = sums.get(k, 0.0) + v * frac
                            m.end_chunk()
                        break
                    except torch.OutOfMemoryError:
                        m.end_chunk()
                        terms = values = {}  # drop the graph before retrying
                        if device.type != "cuda" or (chunk or n) <= 1:
                            raise
                        chunk = max(1, (chunk or n) // 2)
                        torch.cuda.empty_cache()
                        logger.warning("%s: out of GPU memory at iteration %d: %d images a pass from now on "
                                       "(set the option batch_size=%d to start there)", name, it + 1, chunk, chunk)
                if params.grad is not None and not torch.isfinite(params.grad).all():
                    _check_finite({"gradient": float("nan")}, name, it, ckpt_path, last_saved)
                optimizer.step()
                with torch.no_grad():
                    plo, phi = lo.to(params.dtype), hi.to(params.dtype)
                    params.copy_(torch.maximum(torch.minimum(params, phi), plo))
                record = {"iteration": it + 1, "stage": stage.name, "lr": lr, "total": sum(sums.values()), **sums}
                history.append(record)
                it += 1
                ran += 1
                dt = time.perf_counter() - t0
                bar.set_postfix(_postfix(record, n / dt if dt > 0 else 0.0), refresh=False)
                bar.update(1)
                if it == total or (checkpoint_every and it % checkpoint_every == 0):
                    save(it)
    except KeyboardInterrupt:
        if last_saved is not None:
            logger.warning("interrupted at iteration %d: resume from iteration %d with --resume", it, last_saved)
        raise
    finally:
        bar.close()
    if it < total and last_saved != it:
        save(it)  # stopped early by stop_after
    seconds = time.perf_counter() - t_start
    with torch.no_grad():
        images = m.render(params.detach(), stage_at(stages, max(it - 1, 0))).float().cpu().clone()
    if it == total:
        logger.info("%s: %d images after %d iterations (%.2f s/it)", name, n, it, seconds / max(ran, 1))
    return SynthResult(
        images=images,
        targets=m.targets().float().cpu().clone(),
        history=history,
        iteration=it,
        complete=it == total,
        method=name,
        options=opts,
        info=m.describe(),
        seconds=seconds,
        iterations_run=ran,
        fingerprint=fingerprint,
        device={**describe_device(device), "images_per_pass": chunk or n},
        peak_memory_bytes=peak_memory_bytes(device),
    )


def _to_cpu(obj: Any) -> Any:
    """``obj`` (an optimizer state dict: dicts, lists, tensors) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _adam(params: torch.Tensor, opts: SynthOptions) -> torch.optim.Adam:
    return torch.optim.Adam([params], lr=opts.lr or LR_VIT, betas=tuple(opts.betas), eps=1e-8)  # type: ignore[arg-type]


def _chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    step = batch_size or n
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _draw_augmentation(gen: torch.Generator, opts: SynthOptions) -> tuple[tuple[int, int], bool]:
    j = int(opts.jitter or 0)
    shift = torch.randint(-j, j + 1, (2,), generator=gen)
    flip = bool(torch.rand((), generator=gen) < 0.5) and opts.flip
    return (int(shift[0]), int(shift[1])), flip


def _augment(x: torch.Tensor, shift: tuple[int, int], flip: bool) -> torch.Tensor:
    if shift != (0, 0):
        x = torch.roll(x, shifts=shift, dims=(2, 3))
    if flip:
        x = torch.flip(x, dims=(3,))
    return x


def _check_finite(values: dict[str, float], method: str, it: int, ckpt: Path | None, last: int | None) -> None:
    for key, v in values.items():
        if not math.isfinite(v):
            kept = (
                f"the last good checkpoint ({ckpt}, iteration {last}) is kept"
                if ckpt is not None and last is not None
                else "no checkpoint was written"
            )
            raise DfqError(
                f"{method}: loss term '{key}' became {v} at iteration {it + 1}; {kept}. "
                f"Lower the learning rate or the weight of '{key}', or change the seed"
            )


def _postfix(record: dict[str, Any], ips: float) -> dict[str, str]:
    out = {"stage": record["stage"]} if record["stage"] != "main" else {}
    for k, v in record.items():
        if k not in ("iteration", "stage", "lr"):
            out[k] = f"{v:.4g}"
    out["img/s"] = f"{ips:.1f}"
    return out


__all__ = ["SYNTH_REVISION", "SynthResult", "synthesize"]
