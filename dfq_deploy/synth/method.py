"""The interface every synthesis method implements (:class:`SynthMethod`), the view of the registered methods
(:data:`METHODS`), and the model's synthesis mode.

Registering a method as a calibration source (:func:`~dfq_deploy.synth.register.synth_method`) lives in
:mod:`~dfq_deploy.synth.register`, which imports the loop; this module imports neither the loop nor the
checkpoint code, so the dependency reads one way: register -> loop -> checkpoint -> method.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import nn

from dfq_deploy.device import default_synth_precision, model_device
from dfq_deploy.errors import DfqError
from dfq_deploy.synth.attn import is_swin, probe_attention
from dfq_deploy.synth.base import SOURCES
from dfq_deploy.synth.distributed import Shard
from dfq_deploy.synth.draws import ImageDraws
from dfq_deploy.synth.options import LR_SWIN, LR_VIT, SynthOptions
from dfq_deploy.synth.schedule import Stage

logger = logging.getLogger(__name__)


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


class SynthMethod:
    """One data-free synthesis method: its options, random targets and loss terms.

    Subclasses set ``Options`` and implement :meth:`init_state`, :meth:`losses` and :meth:`targets`; they may
    override the other hooks (stages, parameterisation, per-step random draws, attention taps).

    The loop calls :meth:`init_params` and :meth:`init_state` once per image, with that image's own generator,
    and the per-image entries of ``state`` hold the rows of the images this process optimises
    (:attr:`shard`); every ``idx`` a hook receives indexes those rows. A term that couples images (a statistic
    over all images) must go through ``self.shard.gather`` so that it is the same on any number of processes.

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
        #: The images this process optimises (global indices) and the process group; the loop sets it.
        self.shard = Shard(0, self.opts.num_samples, self.opts.num_samples)

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
        if opts.precision is None:
            changes["precision"] = default_synth_precision(self.device)
        return opts.with_(**changes) if changes else opts

    def stages(self) -> list[Stage]:
        """The curriculum: named, contiguous iteration spans covering ``[0, iterations)``."""
        return [Stage("main", 0, self.opts.iterations)]

    def describe(self) -> dict[str, Any]:
        """Extra facts for ``config.json`` (resolved per-model settings, the stage schedule)."""
        return {"stages": [s.to_dict() for s in self.stages()]}

    # -- parameterisation
    def init_params(self, gen: torch.Generator, count: int | None = None) -> torch.Tensor:
        """The optimised tensor of ``count`` images (default ``num_samples``) at iteration 0: standard Gaussian
        noise of the input size. The loop draws one image at a time, from that image's generator."""
        return torch.randn((count or self.opts.num_samples, *self.input_size), generator=gen)

    def adapt_params(self, it: int, stage: Stage, params: torch.Tensor) -> torch.Tensor | None:
        """Return a new parameter tensor to switch parameterisation at ``it`` (Adam restarts), else None."""
        return None

    def render(self, params: torch.Tensor, stage: Stage) -> torch.Tensor:
        """Images (normalised space, input size) from the optimised tensor."""
        return params

    # -- random targets and per-step draws
    def init_state(self, gen: torch.Generator, count: int | None = None) -> None:
        """Draw the method's fixed random targets/priors of ``count`` images (default ``num_samples``) into
        ``self.state``, one row per image along dim 0 (saved in checkpoints). The loop draws one image at a time,
        from that image's generator (right after :meth:`init_params`), and concatenates the rows."""
        raise NotImplementedError

    def step_context(
        self, it: int, stage: Stage, params: torch.Tensor, gen: torch.Generator, draws: ImageDraws | None = None
    ) -> dict[str, Any]:
        """Random draws (and other data) shared by all micro-batches of one step.

        Args:
            it: 0-based iteration.
            stage: the current stage.
            params: the optimised tensor (this process's images).
            gen: the step's generator shared by all images (identical on every rank): draws that every image
                shares.
            draws: per-image draws of this step (row ``i`` from image ``i``'s own generator); None: draw them
                from ``gen`` instead (one process only, for tests).

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


class MethodView:
    """The synthesis methods among the calibration sources: a read-only view of :data:`SOURCES`.

    There is one registry of calibration sources (``--calib NAME``); a method registered with
    :func:`synth_method` is a source whose function carries its :class:`SynthMethod` class as ``.method``.
    """

    def names(self) -> list[str]:
        return [n for n in SOURCES.names() if getattr(SOURCES.get(n), "method", None) is not None]

    def get(self, name: str) -> type[SynthMethod]:
        cls = getattr(SOURCES.get(name), "method", None) if name in SOURCES else None
        if cls is None:
            raise DfqError(f"unknown synthesis method '{name}': choose one of {', '.join(self.names())}")
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self.names()


#: The synthesis methods (psaq, spdfq, dfqvit): the calibration sources that optimise images.
METHODS = MethodView()


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


def options_example(name: str) -> str:
    """A valid ``--options`` JSON for method ``name``: its first own numeric option at its default value."""
    import json

    base = {f.name for f in fields(SynthOptions)}
    own = [f for f in fields(get_method(name).Options) if f.name not in base]
    pick = next((f for f in own if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)), None)
    return json.dumps({pick.name: pick.default} if pick else {"iterations": 200})
