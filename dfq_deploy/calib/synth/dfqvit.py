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
hard       the last ``round(hard_frac * K)``      only with a ``student`` (a quantized copy of the
                                                  model, a callable ``images -> logits``): as detail,
                                                  but each image's cross-entropy is weighted by how
                                                  much the student disagrees with the full-precision
                                                  model on it, ``w_i = 1 + hard_gamma * KL_i / mean(KL)``
                                                  normalised to mean 1, recomputed every step.
=========  =====================================  ==================================================

The stage spans are recorded in ``config.json`` (``info.stages``). Without a student the hard stage is
skipped and detail runs to the end. The final targets are the detail-stage targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dfq_deploy.calib.synth.attn import AttentionTaps
from dfq_deploy.calib.synth.loop import (
    Stage,
    SynthMethod,
    SynthOptions,
    check_option,
    soft_cross_entropy,
    synth_method,
)
from dfq_deploy.calib.synth.psaq import draw_pair_subsets, patch_similarity_entropy

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
        student: callable ``images -> logits`` (a quantized copy of the model); not serialised.
    """

    iterations: int = 1000
    global_frac: float = 0.3
    hard_frac: float = 0.2
    lowres_factor: int = 4
    global_tv_weight: float = 0.5
    easy_confidence: float = 0.9
    detail_confidence: tuple[float, float] = (0.4, 0.7)
    secondary_classes: int = 2
    background: float = 0.05
    entropy_weight: float = 0.5
    kde_points: int = 16
    kde_max_pairs: int = 4096
    hard_gamma: float = 1.0
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
        check_option(self.student is None or callable(self.student), "student must be a callable images -> logits")


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


def disagreement_weights(fp_logits: torch.Tensor, student_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-image weights (mean 1) growing with ``KL(p_fp || p_student)``: ``1 + gamma * KL / mean(KL)``."""
    log_p = F.log_softmax(fp_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)
    w = 1.0 + gamma * kl / kl.mean().clamp_min(1e-12)
    return w / w.mean()


@synth_method("dfqvit")
class Dfqvit(SynthMethod):
    """DFQ-ViT-style easy-to-hard curriculum: global low-res stage, detail stage, optional hard stage."""

    Options = DfqvitOptions
    opts: DfqvitOptions

    def stages(self) -> list[Stage]:
        k = self.opts.iterations
        g = int(round(self.opts.global_frac * k))
        h = int(round(self.opts.hard_frac * k)) if self.opts.student is not None else 0
        h = min(h, k - g - 1) if k - g > 1 else 0
        out = []
        if g:
            out.append(Stage("global", 0, g))
        out.append(Stage("detail", g, k - h, restart_lr=g > 0))
        if h:
            out.append(Stage("hard", k - h, k))
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "student": self.opts.student is not None}

    @property
    def lowres_size(self) -> tuple[int, int]:
        f = self.opts.lowres_factor
        return max(1, self.input_size[1] // f), max(1, self.input_size[2] // f)

    # -- parameterisation: low resolution first
    def init_params(self, gen: torch.Generator) -> torch.Tensor:
        if self.stages()[0].name == "global":
            return torch.randn((self.opts.num_samples, self.input_size[0], *self.lowres_size), generator=gen)
        return super().init_params(gen)

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
    def init_state(self, gen: torch.Generator) -> None:
        n, c = self.opts.num_samples, self.num_classes
        labels = torch.randint(0, c, (n,), generator=gen)
        self.state["labels"] = labels
        self.state["easy_targets"] = easy_targets(labels, c, self.opts.easy_confidence)
        self.state["detail_targets"] = detail_targets(labels, c, self.opts, gen)

    def taps(self) -> AbstractContextManager[Any]:
        self._taps = AttentionTaps(self.model, outputs=True)
        return self._taps

    def tv_weight(self, stage: Stage) -> float:
        return self.opts.global_tv_weight if stage.name == "global" else self.opts.tv_weight

    def step_context(self, it: int, stage: Stage, params: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        ctx: dict[str, Any] = {"pairs": draw_pair_subsets(self.blocks, self.opts.kde_max_pairs, gen)}
        if stage.name == "hard" and self.opts.student is not None:
            with torch.no_grad():
                images = self.render(params.detach(), stage)
                fp = self.model(images)
                self._taps.clear()
                student = self.opts.student(images)
            ctx["weights"] = disagreement_weights(fp, student, self.opts.hard_gamma)
        return ctx

    def losses(
        self, clean: torch.Tensor, views: torch.Tensor, idx: slice, it: int, stage: Stage, ctx: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        o = self.opts
        logits = self.model(views)
        if stage.name == "global":
            return {"ce": soft_cross_entropy(logits, self.state["easy_targets"][idx]).mean()}
        ce = soft_cross_entropy(logits, self.state["detail_targets"][idx])
        if "weights" in ctx:
            ce = ce * ctx["weights"][idx]
        terms = {"ce": ce.mean()}
        if o.entropy_weight:
            ent = patch_similarity_entropy(self._taps, self.blocks, views.shape[0], ctx["pairs"], o.kde_points, None)
            terms["entropy"] = -o.entropy_weight * ent.mean()
        return terms

    def end_chunk(self) -> None:
        self._taps.clear()

    def targets(self) -> torch.Tensor:
        return self.state["detail_targets"]
