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

import hashlib
import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.calib.synth.attn import AttnBlock, is_swin, probe_attention
from dfq_deploy.calib.synth.base import CalibRequest, CalibSet, register_synthesizer
from dfq_deploy.config import SYNTH_PRECISIONS
from dfq_deploy.device import (
    describe_device,
    model_device,
    peak_memory_bytes,
    peak_memory_reset,
    resolve_device,
    synthesis_numerics,
)
from dfq_deploy.errors import DfqError
from dfq_deploy.registry import Registry
from dfq_deploy.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

#: Bump when the images a synthesizer makes for given options change (benchmark caches key on it). It started at
#: the package version it was split from.
SYNTH_REVISION = "0.1.0"
CHECKPOINT_FORMAT = "dfq-synth-checkpoint"
CHECKPOINT_VERSION = 1
LR_VIT = 0.2
LR_SWIN = 0.25

OptionsT = TypeVar("OptionsT", bound="SynthOptions")


# --- options ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthOptions:
    """Settings shared by every synthesizer; each method extends this dataclass with its own fields.

    Fields left at ``None`` are resolved from the model when synthesis starts (the resolved values are what
    ``config.json`` and checkpoints record). Fields whose metadata says ``json=False`` (Python objects such
    as DFQ-ViT's ``student``) are not serialised.

    Attributes:
        num_samples: images to synthesise.
        seed: seed of the ``torch.Generator`` objects that make every random draw.
        iterations: optimisation steps.
        lr: Adam learning rate; None: 0.2, or 0.25 for Swin (PSAQ-ViT's settings).
        betas: Adam betas (DeepInversion / PSAQ-ViT use 0.5, 0.9).
        warmup: fraction of each cosine cycle spent in linear warm-up.
        tv_weight: weight of the total-variation prior.
        jitter: maximum ``torch.roll`` offset in pixels; None: ``max(1, H // 16)`` (14 px at 224, 2 px at 32).
        flip: random horizontal flips.
        batch_size: images per forward/backward pass (memory bound); None: all images at once. Chunks are
            exact: every loss is a mean over images, so the chunks' gradients add up to the full batch's.
        precision: ``fp32``, or ``bf16`` autocast for the forward/backward passes (on the CPU and CUDA alike;
            :func:`dfq_deploy.device.synthesis_numerics`). The images, the optimizer and the checkpoints stay
            float32.
    """

    #: For fields added after checkpoints were first written: the value that reproduces those older runs. A
    #: checkpoint without the field is read as having it (so resuming one asks for that value explicitly).
    replay_defaults: ClassVar[dict[str, Any]] = {"precision": "fp32"}

    num_samples: int = 32
    seed: int = 0
    iterations: int = 1000
    lr: float | None = None
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: float = 0.1
    tv_weight: float = 0.05
    jitter: int | None = None
    flip: bool = True
    batch_size: int | None = None
    precision: str = SYNTH_PRECISIONS[0]

    def __post_init__(self) -> None:
        check_option(self.num_samples >= 1, f"num_samples={self.num_samples}: need at least 1 image")
        check_option(self.iterations >= 1, f"iterations={self.iterations}: need at least 1")
        check_option(self.lr is None or self.lr > 0, f"lr={self.lr} must be > 0")
        check_option(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"betas={self.betas}: two values in [0, 1)",
        )
        check_option(0.0 <= self.warmup < 1.0, f"warmup={self.warmup} must be in [0, 1)")
        check_option(self.tv_weight >= 0, f"tv_weight={self.tv_weight} must be >= 0")
        check_option(self.jitter is None or self.jitter >= 0, f"jitter={self.jitter} must be >= 0 pixels")
        check_option(self.batch_size is None or self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check_option(self.precision in SYNTH_PRECISIONS,
                     f"precision={self.precision!r}: use one of {', '.join(SYNTH_PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists; non-serialisable fields are left out)."""
        out = {}
        for f in fields(self):
            if not f.metadata.get("json", True):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[OptionsT], data: dict[str, Any]) -> OptionsT:
        """Build from a dict such as ``CalibRequest.options`` or a ``config.json`` ``options`` entry.

        Raises:
            DfqError: unknown keys or invalid values.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise DfqError(
                f"unknown option(s) for this synthesizer: {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        args = {}
        for key, value in data.items():
            if isinstance(known[key].default, tuple) and isinstance(value, list):
                value = tuple(value)
            args[key] = value
        try:
            return cls(**args)
        except TypeError as exc:
            raise DfqError(f"bad synthesizer options: {exc}") from exc

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[OptionsT], text: str) -> OptionsT:
        import json

        return cls.from_dict(json.loads(text))

    def with_(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def check_option(ok: bool, message: str) -> None:
    if not ok:
        raise DfqError(f"invalid synthesizer option: {message}")


# --- stages and the learning-rate schedule ----------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A named span ``[start, end)`` of iterations; ``restart_lr`` starts a new warm-up + cosine cycle."""

    name: str
    start: int
    end: int
    restart_lr: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_at(stages: list[Stage], it: int) -> Stage:
    for s in stages:
        if s.start <= it < s.end:
            return s
    return stages[-1]


def lr_at(stages: list[Stage], it: int, base: float, warmup: float) -> float:
    """Learning rate at 0-based iteration ``it``: linear warm-up then cosine decay to 0 within each cycle.

    A cycle starts at iteration 0 and at every stage with ``restart_lr`` and ends where the next one starts.
    """
    starts = sorted({0, *(s.start for s in stages if s.restart_lr)})
    end_total = stages[-1].end
    start = max(s for s in starts if s <= it)
    later = [s for s in starts if s > start]
    length = (later[0] if later else end_total) - start
    t = it - start
    warm = int(round(warmup * length))
    if t < warm:
        return base * (t + 1) / warm
    span = max(1, length - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / span))


# --- shared priors and helpers ----------------------------------------------------------------------------
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of the squared differences between neighbouring pixels in 4 directions.

    Each direction contributes the mean of its squared differences over channels and pixels, so the value
    does not depend on the image size (Gaussian noise gives about 8).
    """
    diffs = (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )
    per_image = sum(d.pow(2).flatten(1).mean(1) for d in diffs)
    return per_image.mean()  # type: ignore[union-attr]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against probability targets: ``-(t * log_softmax(z)).sum(-1)``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def valid_range(data_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds ``((0 - mean) / std, (1 - mean) / std)`` of normalised images, shaped (1, C, 1, 1)."""
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's state dict (names, shapes, dtypes and values), to match checkpoints to models."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def synthesis_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, fused attention off and frozen parameters inside the block; restored on exit."""
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in fused:
            m.fused_attn = False
        yield model
    finally:
        for m, state in fused:
            m.fused_attn = state
        for p, state in grads:
            p.requires_grad_(state)
        model.train(was_training)


# --- the method interface ---------------------------------------------------------------------------------
class SynthMethod:
    """One data-free synthesis method: its options, random targets and loss terms.

    Subclasses set ``Options`` and implement :meth:`init_state`, :meth:`losses` and :meth:`targets`; they may
    override the other hooks (stages, parameterisation, per-step random draws, attention taps).

    Args:
        model: the full-precision model, already in synthesis mode.
        data_cfg: timm data config (``input_size``, ``mean``, ``std``).
        opts: the method's options; ``None`` fields are resolved here from the model.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SynthOptions]] = SynthOptions
    #: Bump when a change of this method's defaults changes the images it makes; benchmark caches key on it
    #: (together with :data:`SYNTH_REVISION`, which covers the shared loop).
    revision: ClassVar[int] = 0

    def __init__(self, model: nn.Module, data_cfg: dict[str, Any], opts: SynthOptions) -> None:
        self.model = model
        self.data_cfg = data_cfg
        self.input_size: tuple[int, int, int] = tuple(data_cfg["input_size"])  # type: ignore[assignment]
        self.blocks, self.num_classes = probe_attention(model, self.input_size)
        self.swin = is_swin(self.blocks)
        self.state: dict[str, torch.Tensor] = {}
        self.device = model_device(model)
        self._on_device: dict[str, tuple[int, torch.Tensor]] = {}
        self.opts = self.resolve_options(opts)

    def on_device(self, key: str) -> torch.Tensor:
        """``self.state[key]`` on the model's device (copied once while the entry stays the same tensor).

        The state itself stays where it was drawn (the CPU, by the CPU generators), so the random draws, and the
        checkpoints, are the same on every device.
        """
        t = self.state[key]
        if t.device == self.device:
            return t
        cached = self._on_device.get(key)
        if cached is None or cached[0] != id(t):
            cached = (id(t), t.to(self.device))
            self._on_device[key] = cached
        return cached[1]

    # -- configuration
    def resolve_options(self, opts: SynthOptions) -> SynthOptions:
        """Fill the ``None`` options from the model (learning rate, jitter, per-model weights)."""
        changes: dict[str, Any] = {}
        if opts.lr is None:
            changes["lr"] = LR_SWIN if self.swin else LR_VIT
        if opts.jitter is None:
            changes["jitter"] = max(1, self.input_size[1] // 16)
        return opts.with_(**changes) if changes else opts

    def stages(self) -> list[Stage]:
        """The curriculum: named, contiguous iteration spans covering ``[0, iterations)``."""
        return [Stage("main", 0, self.opts.iterations)]

    def describe(self) -> dict[str, Any]:
        """Extra facts for ``config.json`` (resolved per-model settings, the stage schedule)."""
        return {"stages": [s.to_dict() for s in self.stages()]}

    # -- parameterisation
    def init_params(self, gen: torch.Generator) -> torch.Tensor:
        """The optimised tensor at iteration 0: standard Gaussian noise of the input size."""
        return torch.randn((self.opts.num_samples, *self.input_size), generator=gen)

    def adapt_params(self, it: int, stage: Stage, params: torch.Tensor) -> torch.Tensor | None:
        """Return a new parameter tensor to switch parameterisation at ``it`` (Adam restarts), else None."""
        return None

    def render(self, params: torch.Tensor, stage: Stage) -> torch.Tensor:
        """Images (normalised space, input size) from the optimised tensor."""
        return params

    # -- random targets and per-step draws
    def init_state(self, gen: torch.Generator) -> None:
        """Draw the method's fixed random targets/priors into ``self.state`` (saved in checkpoints)."""
        raise NotImplementedError

    def step_context(self, it: int, stage: Stage, params: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        """Random draws (and other data) shared by all micro-batches of one step.

        The loop adds ``ctx["augment"] = ((dy, dx), flipped)``, the jitter and flip applied to ``views``.
        """
        return {}

    # -- losses
    def taps(self) -> AbstractContextManager[Any]:
        """Forward hooks active during the whole run (e.g. :class:`AttentionTaps`)."""
        return nullcontext()

    def tv_weight(self, stage: Stage) -> float:
        return self.opts.tv_weight

    def losses(
        self, clean: torch.Tensor, views: torch.Tensor, idx: slice, it: int, stage: Stage, ctx: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms for the images ``idx`` (means over those images); their sum is minimised.

        Args:
            clean: rendered images of the micro-batch, before augmentation (graph attached).
            views: the jittered/flipped images that go through the model.
            idx: which images of the whole set these are (index into ``self.state`` tensors).
            it: 0-based iteration.
            stage: the current stage.
            ctx: this step's :meth:`step_context`.
        """
        raise NotImplementedError

    def end_chunk(self) -> None:
        """Called after each micro-batch's backward pass (drop references to activations here)."""

    def targets(self) -> torch.Tensor:
        """Float targets ``[N, classes]`` (one-hot or soft) that describe the synthesised images."""
        raise NotImplementedError


METHODS: Registry[type[SynthMethod]] = Registry("synthesis method")


def synth_method(name: str) -> Callable[[type[SynthMethod]], type[SynthMethod]]:
    """Register a :class:`SynthMethod` under ``name``, and as the calibration source ``--calib name``."""

    def deco(cls: type[SynthMethod]) -> type[SynthMethod]:
        cls.name = name
        METHODS.register(name)(cls)

        def source(model: nn.Module, req: CalibRequest) -> CalibSet:
            options = dict(req.options)
            progress = bool(options.pop("progress", True))
            options.update(num_samples=req.num_samples, seed=req.seed)
            return synthesize(model, req.data_cfg, name, options, progress=progress).to_calib_set()

        source.__name__ = f"synthesize_{name}"
        source.__doc__ = f"``{name}``: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else name}"
        register_synthesizer(name)(source)
        return cls

    return deco


def get_method(name: str) -> type[SynthMethod]:
    return METHODS.get(name)


def method_options(name: str, options: dict[str, Any] | SynthOptions | None = None, **overrides: Any) -> SynthOptions:
    """The validated options of method ``name`` from a dict (or options object) plus keyword overrides."""
    cls = get_method(name).Options
    if isinstance(options, SynthOptions):
        data = {f.name: getattr(options, f.name) for f in fields(options)}
    else:
        data = dict(options or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls.from_dict(data)


# --- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (temp file + rename)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a synthesis checkpoint (tensors and plain Python data only; no code is unpickled).

    Raises:
        DfqError: missing, unreadable or not a synthesis checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DfqError(f"no synthesis checkpoint at {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DfqError(
            f"synthesis checkpoint {path} could not be read ({type(exc).__name__}): "
            "delete it and start again without --resume"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DfqError(f"{path} is not a dfq-deploy synthesis checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise DfqError(
            f"synthesis checkpoint {path} has version {ckpt.get('version')}: this build reads {CHECKPOINT_VERSION}"
        )
    return ckpt


# --- the loop ---------------------------------------------------------------------------------------------
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
    home = model_device(model)
    target = home if device is None else resolve_device(device)
    if target != home:
        model.to(target)
    try:
        with synthesis_mode(model):
            m = cls(model, data_cfg, opts)
            return _run(m, ckpt_path, resume, checkpoint_every, progress, stop_after)
    finally:
        if target != home:
            model.to(home)


def _run(
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
            _check_resumable(ckpt, m, fingerprint, ckpt_path)
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


def jsonable_cfg(data_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}


def _check_resumable(ckpt: dict[str, Any], m: SynthMethod, fingerprint: str, path: Path) -> None:
    if ckpt["method"] != m.name:
        raise DfqError(
            f"checkpoint {path} was made by method '{ckpt['method']}', not '{m.name}': use --method {ckpt['method']}"
        )
    saved, now = {**m.opts.replay_defaults, **ckpt["options"]}, m.opts.to_dict()
    if saved.get("iterations") != now.get("iterations"):
        raise DfqError(
            f"checkpoint {path} belongs to a {saved.get('iterations')}-iteration run (at iteration "
            f"{ckpt['iteration']}): resume with --iters {saved.get('iterations')}, or start afresh without --resume"
        )
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise DfqError(f"checkpoint {path} was made with other settings ({detail}): resume with the same settings")
    if ckpt["model_fingerprint"] != fingerprint:
        raise DfqError(f"checkpoint {path} was made with a different model or weights: resume with the same --model")
    saved_cfg = ckpt.get("data_cfg", {})
    for key in ("input_size", "mean", "std"):
        if list(saved_cfg.get(key, [])) != list(m.data_cfg[key]):
            raise DfqError(f"checkpoint {path} has {key}={saved_cfg.get(key)}, the model {m.data_cfg[key]}")
    if not 0 <= int(ckpt["iteration"]) <= m.opts.iterations:
        raise DfqError(f"checkpoint {path} is at iteration {ckpt['iteration']}, beyond {m.opts.iterations}")


__all__ = [
    "METHODS",
    "AttnBlock",
    "SynthMethod",
    "SynthOptions",
    "SynthResult",
    "Stage",
    "get_method",
    "load_checkpoint",
    "lr_at",
    "method_options",
    "save_checkpoint",
    "soft_cross_entropy",
    "stage_at",
    "synth_method",
    "synthesize",
    "synthesis_mode",
    "total_variation",
    "valid_range",
]
