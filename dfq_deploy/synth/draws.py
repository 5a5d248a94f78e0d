"""Random draws keyed by image, so that synthesis gives the same images on any number of processes.

Every random number of a synthesis run comes from a CPU ``torch.Generator`` seeded by a hash of a key, never
from a generator shared by all images:

* **per image, once** (:func:`image_generator` ``(seed, index)``): the image's starting pixels, then the
  method's targets and priors for it;
* **per image and step** (:class:`ImageDraws`, keyed ``(seed, index, step)``): draws that differ between images
  in a step, such as SPDFQ's crop boxes, crop flips and which semantic feeds a crop;
* **per step, shared by all images** (:func:`step_generator` ``(seed, step)``): the jitter and flip of the
  whole batch and PSAQ-ViT's token-pair subsets, identical on every rank.

``index`` is the image's global index in ``0 .. num_samples - 1``, so an image's random numbers do not depend on
which process optimises it, on the other images, or on where a run was resumed. No generator state needs to be
checkpointed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def key_seed(*key: object) -> int:
    """A 63-bit seed from a key (a hash: neighbouring seeds and indices give unrelated streams)."""
    text = "dfq-synth:" + ":".join(str(k) for k in key)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s one-off draws (starting pixels, then targets and priors)."""
    return torch.Generator().manual_seed(key_seed(seed, "image", index))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s draws shared by all images (the same on every rank)."""
    return torch.Generator().manual_seed(key_seed(seed, "step", step))


class ImageDraws:
    """Per-image random draws of one step for the images ``indices`` (global indices, in order).

    ``rand((n, *shape))`` returns ``[n, *shape]`` uniforms whose row ``i`` comes from image ``indices[i]``'s own
    generator for this step, keyed ``(seed, index, step)``; successive calls continue each image's stream.

    Args:
        seed: the run's seed.
        indices: global image indices of the rows.
        step: 0-based iteration.
    """

    def __init__(self, seed: int, indices: Sequence[int], step: int) -> None:
        self.seed, self.indices, self.step = seed, indices, step
        self._gens: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        if not shape or shape[0] != len(self.indices):
            raise ValueError(f"ImageDraws.rand{tuple(shape)}: the first dimension must be {len(self.indices)} images")
        if self._gens is None:
            self._gens = [torch.Generator().manual_seed(key_seed(self.seed, "image-step", i, self.step))
                          for i in self.indices]
        return torch.stack([torch.rand(shape[1:], generator=g) for g in self._gens])


def uniform(gen: torch.Generator | ImageDraws, shape: tuple[int, ...]) -> torch.Tensor:
    """``U(0, 1)`` of ``shape``: per image from :class:`ImageDraws` (rows = images), else from one generator."""
    if isinstance(gen, ImageDraws):
        return gen.rand(shape)
    return torch.rand(shape, generator=gen)


__all__ = ["ImageDraws", "image_generator", "key_seed", "step_generator", "uniform"]
