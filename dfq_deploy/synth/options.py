"""Options every synthesizer shares (:class:`SynthOptions`), validated and round-tripping to JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from dfq_deploy.config import SYNTH_PRECISIONS
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


LR_VIT = 0.2


LR_SWIN = 0.25
#: Images a forward/backward pass holds when ``batch_size`` is None, by device type. A fixed size, not "all of a
#: process's images", so that ``torchrun`` shards are whole passes of the one-process run (bitwise the same images
#: on the CPU for up to ``num_samples / 8`` processes). On the CPU a pass of 8 costs the same per image as one of
#: 32 (bundled model, dfqvit: 0.26-0.29 s an iteration either way); on a GPU, 32 keeps the passes large.
DEFAULT_PASS_IMAGES = {"cpu": 8, "cuda": 32}


OptionsT = TypeVar("OptionsT", bound="SynthOptions")


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
        batch_size: images per forward/backward pass; None: :data:`DEFAULT_PASS_IMAGES` for the device (a fixed
            size, so that one process and several make the same passes, and on the CPU the same images bit for
            bit); 0: all of a process's images in one pass. Chunks are exact: every loss is a mean over images,
            so the chunks' gradients add up to the full batch's; only the last bits of the images depend on it.
        precision: ``fp32``, or ``bf16`` autocast for the forward/backward passes (on the CPU and CUDA alike;
            :func:`dfq_deploy.device.synthesis_numerics`); None: ``bf16`` on a CUDA GPU that supports it, ``fp32``
            elsewhere (the committed CPU results are fp32; on the accuracy benchmark, 3 seeds, bf16 synthesis
            changes nothing at W8A8/W4A16, moves the simulated W4A4/W4A3 cells by -0.5/+0.4 points, and is 1.7x
            faster on this VM's CPU). The images, the optimizer and the checkpoints stay float32.
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
    precision: str | None = None

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
        check_option(self.batch_size is None or self.batch_size >= 0,
                     f"batch_size={self.batch_size} must be >= 1 (or 0: all images in one pass)")
        check_option(self.precision is None or self.precision in SYNTH_PRECISIONS,
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

    def pass_images(self, device_type: str) -> int | None:
        """Images per pass on a device of ``device_type`` (``cpu``, ``cuda``); None: all in one pass."""
        if self.batch_size == 0:
            return None
        return self.batch_size or DEFAULT_PASS_IMAGES.get(device_type, DEFAULT_PASS_IMAGES["cpu"])

    def with_(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def check_option(ok: bool, message: str) -> None:
    if not ok:
        raise DfqError(f"invalid synthesizer option: {message}")
