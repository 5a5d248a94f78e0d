"""The optimisation loop shared by every data-free synthesizer (PSAQ-ViT, SPDFQ, DFQ-ViT).

A method (a :class:`SynthMethod` subclass registered with
:func:`~dfq_deploy.synth.register.synth_method`) supplies its loss terms and its own random targets; this module
does everything else, once:

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
* **Random draws** (:mod:`~dfq_deploy.synth.draws`): CPU ``torch.Generator`` objects keyed by hashes, never a
  global RNG: an image's starting pixels and targets/priors come from its own generator keyed by (seed, global
  image index), per-image draws of a step (SPDFQ's crops) from one keyed by (seed, index, step), and the draws
  every image shares in a step (jitter, flip, PSAQ-ViT's token pairs) from one keyed by (seed, step). So an
  image does not depend on which process optimises it or on where a run was resumed.
* **Bookkeeping**: a tqdm progress bar (iteration, loss terms, images/s), a per-iteration history of every
  loss term, and atomic checkpoints every ``checkpoint_every`` iterations and at the end. A checkpoint holds
  the images, Adam's state, the iteration, the method's random targets/priors and the loss history, rows keyed
  by global image index (:mod:`~dfq_deploy.synth.checkpoint`), so a resumed run reproduces an uninterrupted
  one bit for bit on the same machine, with the same or another number of processes.
* **Processes**: under ``torchrun`` every rank optimises a slice of the images
  (:mod:`~dfq_deploy.synth.distributed`); the loss values of every pass are all-gathered so that the history,
  and a stop on a NaN, are the same on every rank; the progress bar and the logs come from rank 0.
* **Failure**: a NaN or inf loss term stops the run with a :class:`DfqError` naming the term; the last good
  checkpoint is left untouched.

Losses are means over images, so ``batch_size`` (micro-batching) only changes the floating point summation
order, not the objective. Per-image results do depend, in their last bits, on the size of the pass they are in
(the model's matrix products sum in another order), which is why the default pass holds a fixed number of images
(:data:`~dfq_deploy.synth.options.DEFAULT_PASS_IMAGES`, not "all of a process's images") and several processes
shard whole passes of the one-process run (:func:`~dfq_deploy.synth.distributed.shard_bounds`).
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
    checkpoint_files,
    find_resume_set,
    jsonable_cfg,
    load_checkpoint,
    model_fingerprint,
    remove_other_checkpoints,
    save_checkpoint,
    select_rows,
    shard_checkpoint_path,
)
from dfq_deploy.synth.distributed import CollectiveError, Comm, Shard, current, local_device, shard_bounds
from dfq_deploy.synth.draws import ImageDraws, image_generator, step_generator
from dfq_deploy.synth.method import SynthMethod, get_method, method_options, synthesis_mode
from dfq_deploy.synth.options import LR_VIT, SynthOptions
from dfq_deploy.synth.priors import total_variation, valid_range
from dfq_deploy.synth.schedule import lr_at, stage_at

logger = logging.getLogger(__name__)


#: Bump when the images a synthesizer makes for given options change (benchmark caches key on it). It started at
#: the package version it was split from.
# 0.2.0: random draws keyed by image (the same images on any number of processes); 0.3.0: passes of a fixed size
# by default (options.DEFAULT_PASS_IMAGES), so several processes make the one-process images bit for bit.
SYNTH_REVISION = "0.3.0"


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
        world_size: processes that synthesised (``torch.distributed``; 1 without it).
        backend: their ``torch.distributed`` backend (``gloo``, ``nccl``; ``none`` for one process).
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
    world_size: int = 1
    backend: str = "none"

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

    In a ``torchrun`` worker (or with a ``torch.distributed`` process group already initialised) the images are
    sharded over the ranks (:mod:`~dfq_deploy.synth.distributed`); every rank returns the whole, gathered
    result, which equals the one-process result for the same seed, and writes its own checkpoint file.

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
        DfqError: bad options, unsuitable model, checkpoint mismatch, or a NaN/inf loss term; under
            torch.distributed also more ranks than images, or ranks that disagree on the model or settings.
    """
    cls = get_method(method)
    opts = options if isinstance(options, cls.Options) else method_options(method, options)  # type: ignore[arg-type]
    if checkpoint_every < 0:
        raise DfqError(f"checkpoint_every={checkpoint_every} must be >= 0")
    if stop_after is not None and stop_after < 0:
        raise DfqError(f"stop_after={stop_after} must be >= 0")
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    files = checkpoint_files(ckpt_path) if resume and ckpt_path is not None else []
    if opts.precision is None and files:
        # the run goes on in the precision it started with, on whichever device it resumes
        saved = load_checkpoint(files[0]).get("options", {})
        opts = opts.with_(precision=saved.get("precision", opts.replay_defaults.get("precision")))
    home = model_device(model)
    target = local_device(home if device is None else resolve_device(device))
    comm = current(target)  # torch.distributed under torchrun (joined here if need be), else this process alone
    if target != home:
        model.to(target)
    try:
        with synthesis_mode(model):
            m = cls(model, data_cfg, opts)
            return _optimise(m, ckpt_path, resume, checkpoint_every, progress, stop_after, comm)
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
    comm: Comm,
) -> SynthResult:
    from tqdm.auto import tqdm

    opts = m.opts
    name = m.name
    total = opts.iterations
    n = opts.num_samples
    stages = m.stages()
    fingerprint = model_fingerprint(m.model)
    comm.check_same("the model", fingerprint,
                    "give every rank the same --model, --checkpoint and --seed (the weights' hashes differ)")
    comm.check_same("the synthesis settings", f"{name}:{opts.to_json()}:{jsonable_cfg(m.data_cfg)}",
                    "give every rank the same method, options, --num-samples and --seed")
    pass_images = opts.pass_images(m.device.type)  # not of the world size: the same passes on any number of ranks
    start_idx, stop_idx = shard_bounds(n, comm.world_size, pass_images)[comm.rank]
    m.shard = shard = Shard(start_idx, stop_idx, n, comm)
    n_local = len(shard)
    history: list[dict[str, Any]] = []
    main = comm.is_main

    loaded: list[tuple[Path, dict[str, Any]]] = []
    if resume and ckpt_path is not None:
        loaded = find_resume_set(ckpt_path, n)
        found = int(loaded[0][1]["iteration"]) if loaded else -1
        seen = {v[0] for v in comm.all_gather_ints([found])}
        if len(seen) > 1:
            raise CollectiveError(f"the ranks see different checkpoints in {ckpt_path.parent} (iterations "
                                  f"{sorted(seen)}): put --output on a filesystem every rank shares")
        for path, ckpt in loaded:
            check_resumable(ckpt, m, fingerprint, path)
        if not loaded and main:
            logger.warning("no checkpoint at %s: starting from iteration 0", ckpt_path)
    device = m.device
    image_keys: list[str]
    if not loaded:
        rows, states = [], []
        for i in shard.indices:  # each image's own generator: the same image on any rank, any world size
            g = image_generator(opts.seed, i)
            rows.append(m.init_params(g, 1))
            m.state = {}
            m.init_state(g, 1)
            states.append(m.state)
        image_keys = list(states[0])
        m.state = {k: torch.cat([s[k] for s in states]) for k in image_keys}
        params = torch.cat(rows).to(device)  # drawn on the CPU: the same images on every device
        start = 0
        saved_optimizer = None
    else:
        picked = select_rows(loaded, start_idx, stop_idx)
        params = picked["params"].to(device, copy=True)
        image_keys = list(picked["state"])
        m.state = {**{k: v.clone() for k, v in picked["state"].items()},
                   **{k: v.clone() for k, v in picked["shared"].items()}}
        saved_optimizer = picked["optimizer"]
        history = list(loaded[0][1]["history"])
        start = int(loaded[0][1]["iteration"])
        if main:
            logger.info("resuming %s from iteration %d/%d (%s)", name, start, total,
                        ", ".join(p.name for p, _ in loaded))
    params.requires_grad_(True)
    optimizer = _adam(params, opts)
    if saved_optimizer is not None:
        optimizer.load_state_dict(saved_optimizer)  # moves the moments to the parameters' device

    lo, hi = (t.to(device) for t in valid_range(m.data_cfg))
    last_saved = start if loaded else None

    def save(it_done: int) -> None:
        nonlocal last_saved
        if ckpt_path is None:
            return
        path = shard_checkpoint_path(ckpt_path, comm.rank, comm.world_size, it_done)
        save_checkpoint(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "method": name,
                "options": opts.to_dict(),
                "iteration": it_done,
                "total": total,
                "indices": torch.arange(start_idx, stop_idx),  # global image index of every row below
                "world_size": comm.world_size,
                "rank": comm.rank,
                "params": params.detach().cpu().clone(),  # checkpoints are CPU tensors: resumable anywhere
                "optimizer": _to_cpu(optimizer.state_dict()),
                "state": {k: v.detach().cpu().clone() for k, v in m.state.items()},
                "image_keys": image_keys,
                "history": history,
                "model_fingerprint": fingerprint,
                "data_cfg": jsonable_cfg(m.data_cfg),
            },
        )
        comm.barrier()  # every rank has its file of this iteration: the older set can go
        if main:
            mine = [shard_checkpoint_path(ckpt_path, r, comm.world_size, it_done) for r in range(comm.world_size)]
            remove_other_checkpoints(ckpt_path, mine)
        last_saved = it_done
        logger.debug("checkpoint at iteration %d -> %s", it_done, path)

    it = start
    ran = 0
    chunk = pass_images  # images per forward/backward pass (None: all); halved on CUDA out-of-memory
    peak_memory_reset(device)
    t_start = time.perf_counter()
    bar = tqdm(total=total, initial=start, disable=not (progress and main), desc=f"synth {name}", unit="it",
               dynamic_ncols=True)
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
                gen_step = step_generator(opts.seed, it)  # shared by all images: the same on every rank
                shift, flip = _draw_augmentation(gen_step, opts)
                draws = ImageDraws(opts.seed, shard.indices, it)  # per image: keyed by its global index
                ctx = m.step_context(it, stage, params, gen_step, draws)
                ctx["augment"] = (shift, flip)
                while True:  # one step; on CUDA out-of-memory, again in half-size chunks (chunks are exact)
                    optimizer.zero_grad(set_to_none=True)
                    passes: list[tuple[int, dict[str, float]]] = []
                    try:
                        for idx in _chunks(n_local, chunk):
                            frac = (idx.stop - idx.start) / n
                            with synthesis_numerics(device, opts.precision):
                                clean = m.render(params[idx], stage)
                                views = _augment(clean, shift, flip)
                                terms = m.losses(clean, views, idx, it, stage, ctx)
                                w_tv = m.tv_weight(stage)
                                if w_tv:
                                    terms["tv"] = w_tv * total_variation(clean)
                            values = {k: float(v.detach()) for k, v in terms.items()}
                            passes.append((idx.stop - idx.start, values))
                            if all(math.isfinite(v) for v in values.values()):  # else: stop below, on every rank
                                (sum(terms.values()) * frac).backward()  # type: ignore[union-attr]
                            m.end_chunk()
                        break
                    except torch.OutOfMemoryError:
                        m.end_chunk()
                        terms = values = {}  # drop the graph before retrying
                        if device.type != "cuda" or (chunk or n_local) <= 1:
                            raise
                        chunk = max(1, (chunk or n_local) // 2)
                        torch.cuda.empty_cache()
                        logger.warning("%s: out of GPU memory at iteration %d: %d images a pass from now on "
                                       "(set the option batch_size=%d to start there)", name, it + 1, chunk, chunk)
                grad_ok = params.grad is None or bool(torch.isfinite(params.grad).all())
                sums, grads_ok = _combine_passes(comm, passes, grad_ok, n)
                for _, values in sums:
                    _check_finite(values, name, it, ckpt_path, last_saved)
                if not grads_ok:
                    _check_finite({"gradient": float("nan")}, name, it, ckpt_path, last_saved)
                optimizer.step()
                with torch.no_grad():
                    plo, phi = lo.to(params.dtype), hi.to(params.dtype)
                    params.copy_(torch.maximum(torch.minimum(params, phi), plo))
                terms_sum: dict[str, float] = {}
                for size, values in sums:  # the one-process order of the passes: the same sums bit for bit
                    for k, v in values.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + v * (size / n)
                record = {"iteration": it + 1, "stage": stage.name, "lr": lr, "total": sum(terms_sum.values()),
                          **terms_sum}
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
    images = shard.gather(images)
    targets = shard.gather(m.targets().float().cpu().clone())
    if it == total and main:
        logger.info("%s: %d images after %d iterations (%.2f s/it%s)", name, n, it, seconds / max(ran, 1),
                    f", {comm.world_size} processes" if comm.active else "")
    return SynthResult(
        images=images,
        targets=targets,
        history=history,
        iteration=it,
        complete=it == total,
        method=name,
        options=opts,
        info=m.describe(),
        seconds=seconds,
        iterations_run=ran,
        fingerprint=fingerprint,
        device={**describe_device(device), "images_per_pass": min(chunk or n_local, n_local)},
        peak_memory_bytes=peak_memory_bytes(device),
        world_size=comm.world_size,
        backend=comm.backend,
    )


def _combine_passes(
    comm: Comm, passes: list[tuple[int, dict[str, float]]], grad_ok: bool, n: int
) -> tuple[list[tuple[int, dict[str, float]]], bool]:
    """Every rank's (images, loss values) per forward pass, in global image order, and whether all gradients
    are finite: all-gathered, so every rank sums the history, and stops on a NaN, alike."""
    if not comm.active:
        return passes, grad_ok
    keys = list(passes[0][1])
    table = torch.tensor([[float(size), float(grad_ok), *(vals[k] for k in keys)] for size, vals in passes],
                         dtype=torch.float64)
    rows = comm.all_gather_rows(table)
    out = [(int(r[0]), dict(zip(keys, r[2:].tolist(), strict=True))) for r in rows]
    return out, bool((rows[:, 1] > 0).all())


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
