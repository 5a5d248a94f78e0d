"""``dfqvit``: easy-to-hard synthesis after DFQ-ViT (Tong et al., "DFQ-ViT: Data-Free Quantization for Vision
Transformers without Fine-tuning", 2025).

DFQ-ViT synthesises samples "in order of increasing difficulty" so that they carry both the global and the
local features of real images. The paper's exact schedule is not public; this module implements the
following documented curriculum, a schedule over the iterations (``K = iterations``):

=========  =====================================  ==================================================
stage      iterations                             what is optimised
=========  =====================================  ==================================================
global     ``[0, round(global_frac * K))``        a low-resolution image (``H / lowres_factor``),
                                                  bilinearly upsampled to the input size; strong TV
                                                  (``global_tv_weight``); *easy* targets: one class
                                                  with probability ``easy_confidence``, the rest
                                                  spread evenly. Learns layout and colour, the global
                                                  evidence of one class.
detail     up to the hard stage (or the end)      full-resolution pixels, initialised from the
                                                  upsampled low-resolution image (Adam and the cosine
                                                  schedule restart); weak TV (``tv_weight``); *harder*
                                                  targets: the same main class at a lower probability
                                                  ``U(detail_confidence)`` plus 1..``secondary_classes``
                                                  secondary classes sharing most of the rest; PSAQ-ViT's
                                                  patch-similarity entropy (``entropy_weight``) spreads
                                                  the local token responses.
hard       the last ``round(hard_frac * K)``      only with a student, the quantized model the images
                                                  are for: ``hard_student`` (a preset name or
                                                  QuantConfig dict; dfqvit then quantizes a copy of the
                                                  model itself and calibrates its activation ranges on
                                                  the current images at the start of the stage and
                                                  every ``student_refresh`` iterations) or ``student``
                                                  (any callable ``images -> logits``). As detail, but
                                                  each image's cross-entropy is weighted by how much
                                                  the student disagrees with the full-precision model
                                                  on it, ``w_i = 1 + hard_gamma * KL_i / mean(KL)``
                                                  normalised to mean 1, recomputed every step. With
                                                  ``hard_adversarial > 0`` the images also maximise
                                                  ``hard_adversarial * KL(p_fp || p_student)`` (through
                                                  the student's straight-through quantizers): they move
                                                  towards inputs the quantized model gets wrong.
=========  =====================================  ==================================================

The stage spans are recorded in ``config.json`` (``info.stages``). Without a student the hard stage is
skipped and detail runs to the end. The final targets are the detail-stage targets. The built-in student's
activation scales are part of the method state, so a run resumed inside the hard stage continues with the
same student.

Measured on the bundled model (README, "What the synthesis methods do"): over 20 seeds the global stage gains
0.39 +- 0.14 points (standard error of the paired difference; seeds 0-9 +0.41, seeds 10-19 +0.37) at W4A4,
0.3-0.7 +- 0.5 at 3-bit activations, and costs 0.23 +- 0.08 at W2A16 (weight-only: use ``global_frac=0``
there); the hard stage (student reweighting) changes nothing measurable over 5 seeds and the adversarial term
lowered accuracy in a 2-seed probe, so neither is on by default.

Several processes (``torchrun``): the global and detail stages have no term that couples images, so the
sharded result is bitwise the one-process result (the shards are whole passes, by default and with
``batch_size`` set). The hard stage couples them twice, and both go through a collective: the disagreement
weights are normalised over all images (each rank all-gathers the full-precision and student logits of every
image and computes the one-process weights), and the built-in student's activation ranges are fitted on all
images (each rank all-gathers the images; every rank then holds the same ranges). Its result equals the
one-process result within floating-point tolerance (the no-grad forward passes of the weights see a rank's
images, not all of them, so their matrix products sum in another order; the test allows 1e-4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.config import QuantConfig, preset
from dfq_deploy.errors import DfqError
from dfq_deploy.registry import Registry
from dfq_deploy.synth.attn import AttentionTaps
from dfq_deploy.synth.draws import ImageDraws
from dfq_deploy.synth.method import SynthMethod
from dfq_deploy.synth.options import SynthOptions, check_option
from dfq_deploy.synth.priors import soft_cross_entropy
from dfq_deploy.synth.psaq import draw_pair_subsets, patch_similarity_entropy
from dfq_deploy.synth.register import synth_method
from dfq_deploy.synth.schedule import Stage

logger = logging.getLogger(__name__)

STAGES = ("global", "detail", "hard")


@dataclass(frozen=True)
class DfqvitOptions(SynthOptions):
    """DFQ-ViT curriculum settings (see :class:`SynthOptions` for the shared ones; ``tv_weight`` is the
    detail/hard-stage TV weight).

    Attributes:
        global_frac: fraction of the iterations in the global stage.
        hard_frac: fraction of the iterations in the hard stage (only with a ``student``).
        lowres_factor: the global stage optimises images ``lowres_factor`` times smaller per side.
        global_tv_weight: TV weight of the global stage.
        easy_confidence: main-class probability of the easy (global-stage) targets.
        detail_confidence: range of the main-class probability of the detail targets.
        secondary_classes: at most this many secondary classes in a detail target (1 or more drawn).
        background: probability mass spread evenly over all classes in the detail targets.
        entropy_weight: weight of the patch-similarity entropy in the detail and hard stages.
        kde_points: KDE evaluation points for that entropy.
        kde_max_pairs: token pairs per image and block that feed it at most.
        hard_gamma: strength of the disagreement weighting in the hard stage.
        hard_adversarial: weight of the hard-stage term that maximises the student's disagreement (0: off).
        hard_student: quantization of the built-in student (a preset name such as ``W4A4`` or a
            ``QuantConfig.to_dict()``); None: no built-in student.
        student_refresh: the built-in student's activation ranges are re-fitted on the current images every
            this many hard-stage iterations.
        student: callable ``images -> logits`` (a quantized copy of the model); not serialised. Takes
            precedence over ``hard_student``.
    """

    iterations: int = 1000
    # the schedule
    global_frac: float = 0.3
    hard_frac: float = 0.2
    # the global stage
    lowres_factor: int = 4
    global_tv_weight: float = 0.5
    easy_confidence: float = 0.9
    # the detail stage
    detail_confidence: tuple[float, float] = (0.4, 0.7)
    secondary_classes: int = 2
    background: float = 0.05
    entropy_weight: float = 0.5
    kde_points: int = 16
    kde_max_pairs: int = 4096
    # the hard stage
    hard_gamma: float = 1.0
    hard_adversarial: float = 0.0
    hard_student: str | dict[str, Any] | None = None
    student_refresh: int = 10
    student: Callable[[torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False, repr=False, metadata={"json": False}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(0.0 <= self.global_frac < 1.0, f"global_frac={self.global_frac} must be in [0, 1)")
        check_option(0.0 <= self.hard_frac < 1.0, f"hard_frac={self.hard_frac} must be in [0, 1)")
        check_option(self.global_frac + self.hard_frac < 1.0, "global_frac + hard_frac must leave a detail stage")
        check_option(self.lowres_factor >= 1, f"lowres_factor={self.lowres_factor} must be >= 1")
        check_option(self.global_tv_weight >= 0, f"global_tv_weight={self.global_tv_weight} must be >= 0")
        check_option(0.0 <= self.background < 1.0, f"background={self.background} must be in [0, 1)")
        check_option(0.0 < self.easy_confidence <= 1.0, f"easy_confidence={self.easy_confidence} must be in (0, 1]")
        lo, hi = self.detail_confidence
        check_option(0.0 < lo <= hi < 1.0 - self.background, f"detail_confidence={self.detail_confidence} is invalid")
        check_option(self.secondary_classes >= 1, f"secondary_classes={self.secondary_classes} must be >= 1")
        check_option(self.entropy_weight >= 0, f"entropy_weight={self.entropy_weight} must be >= 0")
        check_option(self.kde_points >= 4 and self.kde_max_pairs >= 16, "kde_points >= 4 and kde_max_pairs >= 16")
        check_option(self.hard_gamma >= 0, f"hard_gamma={self.hard_gamma} must be >= 0")
        check_option(self.hard_adversarial >= 0, f"hard_adversarial={self.hard_adversarial} must be >= 0")
        check_option(self.student is None or callable(self.student), "student must be a callable images -> logits")
        check_option(self.student_refresh >= 1, f"student_refresh={self.student_refresh} must be >= 1")
        if self.hard_student is not None:
            student_config(self.hard_student)  # raises on an unknown preset or a bad config

    @property
    def has_student(self) -> bool:
        return self.student is not None or self.hard_student is not None


def student_config(spec: str | dict[str, Any] | QuantConfig) -> QuantConfig:
    """The QuantConfig of a ``hard_student`` setting (preset name, config dict or config)."""
    if isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    if isinstance(spec, dict):
        return QuantConfig.from_dict(spec)
    raise DfqError(f"hard_student={spec!r}: give a preset name (e.g. W4A4) or a QuantConfig dict")


class Student(Protocol):
    """What the hard stage needs of a quantized student (:class:`dfq_deploy.quant.student.QuantStudent`)."""

    def calibrate(self, images: torch.Tensor) -> torch.Tensor: ...
    def load_scales(self, scales: torch.Tensor) -> None: ...
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
    def differentiable(self, images: torch.Tensor) -> torch.Tensor: ...


#: Students by kind; ``dfq_deploy.quant`` registers ``fake-quant`` (synthesis does not import quantization).
STUDENTS: Registry[Callable[[nn.Module, QuantConfig], Student]] = Registry("synthesis student")


def register_student(name: str) -> Callable[[Any], Any]:
    return STUDENTS.register(name)


def make_student(model: nn.Module, config: QuantConfig) -> Student:
    """The registered fake-quant student of ``model`` under ``config``."""
    if "fake-quant" not in STUDENTS:
        raise DfqError("hard_student needs the quantization stage: import dfq_deploy.quant first (export does), "
                       "or pass a callable student")
    return STUDENTS.get("fake-quant")(model, config)


def easy_targets(labels: torch.Tensor, num_classes: int, confidence: float) -> torch.Tensor:
    """One main class with probability ``confidence``; the rest spread evenly over the other classes."""
    if num_classes == 1:
        return torch.ones(len(labels), 1)
    t = torch.full((len(labels), num_classes), (1.0 - confidence) / (num_classes - 1))
    return t.scatter(1, labels[:, None], confidence)


def detail_targets(labels: torch.Tensor, num_classes: int, opts: DfqvitOptions, gen: torch.Generator) -> torch.Tensor:
    """Lower-confidence multi-class targets.

    The main class gets ``U(detail_confidence)``; ``1..secondary_classes`` other classes share the rest
    (random proportions) except a ``background`` mass spread evenly over all classes.
    """
    n = len(labels)
    if num_classes == 1:
        return torch.ones(n, 1)
    lo, hi = opts.detail_confidence
    main = lo + (hi - lo) * torch.rand((n,), generator=gen)
    k_max = min(opts.secondary_classes, num_classes - 1)
    order = torch.rand((n, num_classes), generator=gen).scatter(1, labels[:, None], 2.0).argsort(dim=1)
    secondary = order[:, :k_max]  # the main class sorts last, so it is never secondary
    k = torch.randint(1, k_max + 1, (n,), generator=gen)
    share = (torch.rand((n, k_max), generator=gen) + 0.5) * (torch.arange(k_max)[None, :] < k[:, None])
    share = share / share.sum(dim=1, keepdim=True)
    t = torch.full((n, num_classes), opts.background / num_classes)
    t = t.scatter_add(1, secondary, (1.0 - main - opts.background)[:, None] * share)
    return t.scatter_add(1, labels[:, None], main[:, None])


def logit_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p) || softmax(q))``."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits.float(), dim=-1))).sum(dim=-1)


def disagreement_weights(fp_logits: torch.Tensor, student_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-image weights (mean 1) growing with ``KL(p_fp || p_student)``: ``1 + gamma * KL / mean(KL)``."""
    kl = logit_kl(fp_logits, student_logits).clamp_min(0.0)
    w = 1.0 + gamma * kl / kl.mean().clamp_min(1e-12)
    return w / w.mean()


@synth_method("dfqvit")
class Dfqvit(SynthMethod):
    """DFQ-ViT-style easy-to-hard curriculum: global low-res stage, detail stage, optional hard stage."""

    Options = DfqvitOptions
    opts: DfqvitOptions

    def __init__(self, model: nn.Module, data_cfg: dict[str, Any], opts: DfqvitOptions) -> None:
        super().__init__(model, data_cfg, opts)
        self._qstudent: Student | None = None
        if self.opts.student is None and self.opts.hard_student is not None and any(
            s.name == "hard" for s in self.stages()
        ):
            self._qstudent = make_student(model, student_config(self.opts.hard_student))

    def stages(self) -> list[Stage]:
        k = self.opts.iterations
        g = int(round(self.opts.global_frac * k))
        h = int(round(self.opts.hard_frac * k)) if self.opts.has_student else 0
        h = min(h, k - g - 1) if k - g > 1 else 0
        out = []
        if g:
            out.append(Stage("global", 0, g))
        out.append(Stage("detail", g, k - h, restart_lr=g > 0))
        if h:
            out.append(Stage("hard", k - h, k))
        return out

    def describe(self) -> dict[str, Any]:
        student = "callable" if self.opts.student is not None else self.opts.hard_student
        return {**super().describe(), "student": student}

    @property
    def lowres_size(self) -> tuple[int, int]:
        f = self.opts.lowres_factor
        return max(1, self.input_size[1] // f), max(1, self.input_size[2] // f)

    # -- parameterisation: low resolution first
    def init_params(self, gen: torch.Generator, count: int | None = None) -> torch.Tensor:
        if self.stages()[0].name == "global":
            shape = (count or self.opts.num_samples, self.input_size[0], *self.lowres_size)
            return torch.randn(shape, generator=gen)
        return super().init_params(gen, count)

    def adapt_params(self, it: int, stage: Stage, params: torch.Tensor) -> torch.Tensor | None:
        if stage.name != "global" and tuple(params.shape[-2:]) != tuple(self.input_size[1:]):
            logger.debug("dfqvit: switching to full resolution at iteration %d", it)
            return self._upsample(params)
        return None

    def render(self, params: torch.Tensor, stage: Stage) -> torch.Tensor:
        if tuple(params.shape[-2:]) != tuple(self.input_size[1:]):
            return self._upsample(params)
        return params

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        # bilinear interpolation is a convex combination, so the clipped range is preserved
        return F.interpolate(x, size=self.input_size[1:], mode="bilinear", align_corners=False)

    # -- targets
    def init_state(self, gen: torch.Generator, count: int | None = None) -> None:
        n, c = count or self.opts.num_samples, self.num_classes
        labels = torch.randint(0, c, (n,), generator=gen)
        self.state["labels"] = labels
        self.state["easy_targets"] = easy_targets(labels, c, self.opts.easy_confidence)
        self.state["detail_targets"] = detail_targets(labels, c, self.opts, gen)

    def taps(self) -> AbstractContextManager[Any]:
        self._taps = AttentionTaps(self.model, outputs=True)
        return self._taps

    def tv_weight(self, stage: Stage) -> float:
        return self.opts.global_tv_weight if stage.name == "global" else self.opts.tv_weight

    def step_context(
        self, it: int, stage: Stage, params: torch.Tensor, gen: torch.Generator, draws: ImageDraws | None = None
    ) -> dict[str, Any]:
        ctx: dict[str, Any] = {"pairs": draw_pair_subsets(self.blocks, self.opts.kde_max_pairs, gen)}
        if stage.name == "hard" and self.opts.has_student:
            with torch.no_grad():
                images = self.render(params.detach(), stage)
                student = self.opts.student
                if student is None:
                    student = self._refresh_student(it - stage.start, images)
                fp = self.model(images)
                self._taps.clear()
                student_logits = student(images)
            # normalised over all images: every rank computes the weights of all of them, keeps its rows
            shard = self.shard
            weights = disagreement_weights(shard.gather(fp), shard.gather(student_logits), self.opts.hard_gamma)
            ctx["weights"] = shard.local(weights)
            ctx["student"] = getattr(student, "differentiable", student)
        return ctx

    def _refresh_student(self, step: int, images: torch.Tensor) -> Student:
        """The built-in student, its ranges fitted on ``images`` every ``student_refresh`` hard-stage steps (or
        restored from the method state after a resume)."""
        assert self._qstudent is not None
        if step % self.opts.student_refresh == 0 or "student.scales" not in self.state:
            # fitted on all images (gathered from every rank): the same ranges on every rank
            self.state["student.scales"] = self._qstudent.calibrate(self.shard.gather(images))
        else:  # a few dozen scalars: cheap, and right after a resume too
            self._qstudent.load_scales(self.state["student.scales"])
        return self._qstudent

    def losses(
        self, clean: torch.Tensor, views: torch.Tensor, idx: slice, it: int, stage: Stage, ctx: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        o = self.opts
        logits = self.model(views)
        if stage.name == "global":
            return {"ce": soft_cross_entropy(logits, self.on_device("easy_targets")[idx]).mean()}
        ce = soft_cross_entropy(logits, self.on_device("detail_targets")[idx])
        if "weights" in ctx:
            ce = ce * ctx["weights"][idx]
        terms = {"ce": ce.mean()}
        if o.entropy_weight:
            ent = patch_similarity_entropy(self._taps, self.blocks, views.shape[0], ctx["pairs"], o.kde_points, None)
            terms["entropy"] = -o.entropy_weight * ent.mean()
        if o.hard_adversarial and "student" in ctx:
            student_logits = ctx["student"](views)
            if not student_logits.requires_grad:
                raise DfqError("hard_adversarial needs a student whose logits carry a gradient to the images")
            terms["adversarial"] = -o.hard_adversarial * logit_kl(logits, student_logits).mean()
        return terms

    def end_chunk(self) -> None:
        self._taps.clear()

    def targets(self) -> torch.Tensor:
        return self.state["detail_targets"]
