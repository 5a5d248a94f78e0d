"""``psaq``: PSAQ-ViT (Li et al., "Patch Similarity Aware Data-Free Quantization for Vision Transformers", ECCV 2022).

Real images make a ViT's patch tokens respond diversely, Gaussian noise makes them all alike. PSAQ-ViT turns
this into a loss: for every block, take the cosine similarities between the patch tokens of the MHSA output,
estimate their density with a Gaussian kernel density estimate (KDE) and **maximise its differential
entropy**, so the similarities spread out as they do for real images. Together with a cross-entropy towards
random target classes and a total-variation prior::

    loss = ce_weight * CE(f(x), y) - entropy_weight * sum_blocks H(KDE(cos_sim(patch tokens))) + 0.05 * TV(x)

Implementation notes (compared with the authors' public code, which was read, not copied):

* The tokens are the attention module's output (MHSA after its projection); the official code hooks the
  ``attn @ v`` product and averages it over heads. For Swin, similarities are taken inside each window and
  pooled per image.
* Similarities are the distinct pairs (upper triangle, no self-similarity). When a block has more than
  ``kde_max_pairs`` pairs per image, a random subset (the same for every image in a step) feeds the KDE, to
  bound memory at 224 px.
* The KDE bandwidth follows Silverman's rule per image (``kde_bandwidth=None``) instead of the fixed 0.01,
  and the density is integrated with the trapezoid rule over ``kde_points`` points spanning the data +- 3
  bandwidths (the official code uses 10 points between the minimum and maximum).
* The official generator runs two 500-iteration cosine cycles; the default here is one 1000-iteration cycle.
  Its TV term pulls towards a random target value, here TV is simply minimised.

Several processes (``torchrun``): no term couples images. The token-pair subsets are drawn once per step from
the step's shared generator, identical on every rank, so the sharded result is bitwise the one-process result
(the shards are whole passes, by default and with ``batch_size`` set).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfq_deploy.synth.attn import AttentionTaps, AttnBlock
from dfq_deploy.synth.draws import ImageDraws
from dfq_deploy.synth.method import SynthMethod
from dfq_deploy.synth.options import SynthOptions, check_option
from dfq_deploy.synth.register import synth_method
from dfq_deploy.synth.schedule import Stage


@dataclass(frozen=True)
class PsaqOptions(SynthOptions):
    """PSAQ-ViT settings (see :class:`SynthOptions` for the shared ones).

    Attributes:
        ce_weight: weight of the cross-entropy to the random target classes.
        entropy_weight: weight of the patch-similarity differential entropy (maximised).
        kde_points: evaluation points of the KDE for the entropy integral.
        kde_bandwidth: Gaussian kernel bandwidth; None: Silverman's rule per image.
        kde_max_pairs: at most this many token pairs per image and block feed the KDE.
    """

    iterations: int = 1000
    ce_weight: float = 1.0
    entropy_weight: float = 1.0
    kde_points: int = 16
    kde_bandwidth: float | None = None
    kde_max_pairs: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(self.ce_weight >= 0 and self.entropy_weight >= 0, "ce_weight and entropy_weight must be >= 0")
        check_option(self.kde_points >= 4, f"kde_points={self.kde_points} must be >= 4")
        check_option(
            self.kde_bandwidth is None or self.kde_bandwidth > 0, f"kde_bandwidth={self.kde_bandwidth} must be > 0"
        )
        check_option(self.kde_max_pairs >= 16, f"kde_max_pairs={self.kde_max_pairs} must be >= 16")


# --- the patch-similarity entropy (also used by dfqvit) -------------------------------------------------------
def pairs_per_image(block: AttnBlock) -> int:
    """Distinct token pairs per image whose similarity :func:`patch_similarities` returns."""
    n = block.spatial
    return block.windows * n * (n - 1) // 2


def draw_pair_subsets(blocks: list[AttnBlock], max_pairs: int, gen: torch.Generator) -> list[torch.Tensor | None]:
    """Per block, a random subset of pair indices when the block has more than ``max_pairs`` pairs, else None."""
    out: list[torch.Tensor | None] = []
    for b in blocks:
        m = pairs_per_image(b)
        out.append(torch.randperm(m, generator=gen)[:max_pairs] if m > max_pairs else None)
    return out


def patch_similarities(
    out: torch.Tensor, block: AttnBlock, batch: int, subset: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarities between distinct patch tokens, ``[batch, pairs]``.

    Args:
        out: the attention module's output for ``batch`` images (see :mod:`~dfq_deploy.synth.attn`).
        block: its geometry.
        batch: images in the forward pass (Swin rows are ``batch * windows``).
        subset: optional pair indices (from :func:`draw_pair_subsets`).
    """
    tokens = out[:, block.prefix :] if block.kind == "vit" else out
    tokens = F.normalize(tokens.float(), dim=-1)
    sims = tokens @ tokens.transpose(1, 2)
    n = tokens.shape[1]
    iu = torch.triu_indices(n, n, offset=1)
    pairs = sims[:, iu[0], iu[1]].reshape(batch, -1)
    return pairs if subset is None else pairs[:, subset]


def kde_differential_entropy(samples: torch.Tensor, points: int = 32, bandwidth: float | None = None) -> torch.Tensor:
    """Differential entropy ``-int p log p`` of a Gaussian KDE of each row of ``samples`` ``[batch, m]``.

    Args:
        samples: one row of scalar samples per image.
        points: trapezoid-rule evaluation points, spanning each row's range +- 3 bandwidths.
        bandwidth: kernel bandwidth; None: Silverman's rule ``1.06 * std * m^(-1/5)`` per row.

    Returns:
        ``[batch]`` entropies (differentiable w.r.t. ``samples``).
    """
    m = samples.shape[1]
    with torch.no_grad():
        if bandwidth is None:
            h = (1.06 * samples.std(dim=1) * m ** (-0.2)).clamp_min(1e-3)
        else:
            h = torch.full((samples.shape[0],), float(bandwidth), device=samples.device)
        lo = samples.min(dim=1).values - 3 * h
        hi = samples.max(dim=1).values + 3 * h
        t = torch.linspace(0.0, 1.0, points, dtype=samples.dtype, device=samples.device)
        grid = lo[:, None] + (hi - lo)[:, None] * t[None, :]  # [batch, points]
    # Scale the small tensors by 1/h before the [batch, points, m] broadcast (one big division fewer).
    z = (grid / h[:, None])[:, :, None] - (samples / h[:, None])[:, None, :]
    density = torch.exp(-0.5 * z * z).mean(dim=-1) / (h[:, None] * math.sqrt(2 * math.pi))
    integrand = -density * torch.log(density.clamp_min(1e-12))
    return torch.trapezoid(integrand, x=grid, dim=-1)


def patch_similarity_entropy(
    taps: AttentionTaps,
    blocks: list[AttnBlock],
    batch: int,
    subsets: list[torch.Tensor | None],
    points: int,
    bandwidth: float | None,
    rows: slice | None = None,
) -> torch.Tensor:
    """Sum over blocks of the per-image KDE entropy of patch similarities, ``[batch]``.

    ``rows`` selects the images (and, for Swin, their windows) of a larger forward batch; by default the
    first ``batch`` images.
    """
    total: torch.Tensor | None = None  # the first term as is: exactly zeros + term, on the taps' device
    for block, subset in zip(blocks, subsets, strict=True):
        out = taps.output(block.index)
        rows_per_image = block.windows
        start = 0 if rows is None else rows.start
        out = out[start * rows_per_image : (start + batch) * rows_per_image]
        # float32 whatever the synthesis precision: under bf16 autocast the similarities and the KDE's
        # (grid - sample) / h differences lose most of their gradient (cosine 0.93 to fp32's, measured)
        with torch.autocast(out.device.type, enabled=False):
            sims = patch_similarities(out.float(), block, batch, subset)
            ent = kde_differential_entropy(sims, points, bandwidth)
        total = ent if total is None else total + ent
    return torch.zeros(batch) if total is None else total


# --- the method ---------------------------------------------------------------------------------------------
@synth_method("psaq")
class Psaq(SynthMethod):
    """PSAQ-ViT: maximise patch-similarity entropy, cross-entropy to random classes, TV prior."""

    Options = PsaqOptions
    opts: PsaqOptions

    def init_state(self, gen: torch.Generator, count: int | None = None) -> None:
        self.state["labels"] = torch.randint(0, self.num_classes, (count or self.opts.num_samples,), generator=gen)

    def taps(self) -> AbstractContextManager[Any]:
        self._taps = AttentionTaps(self.model, outputs=True)
        return self._taps

    def step_context(
        self, it: int, stage: Stage, params: torch.Tensor, gen: torch.Generator, draws: ImageDraws | None = None
    ) -> dict[str, Any]:
        return {"pairs": draw_pair_subsets(self.blocks, self.opts.kde_max_pairs, gen)}  # shared: the same on every rank

    def losses(
        self, clean: torch.Tensor, views: torch.Tensor, idx: slice, it: int, stage: Stage, ctx: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        o = self.opts
        logits = self.model(views)
        ce = F.cross_entropy(logits, self.on_device("labels")[idx])
        ent = patch_similarity_entropy(
            self._taps, self.blocks, views.shape[0], ctx["pairs"], o.kde_points, o.kde_bandwidth
        )
        return {"ce": o.ce_weight * ce, "entropy": -o.entropy_weight * ent.mean()}

    def end_chunk(self) -> None:
        self._taps.clear()

    def targets(self) -> torch.Tensor:
        return F.one_hot(self.state["labels"], self.num_classes).float()
