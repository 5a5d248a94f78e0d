"""Registering a :class:`~dfq_deploy.synth.method.SynthMethod` as a calibration source (``--calib NAME``).

The source a method registers runs it through the shared loop (:func:`~dfq_deploy.synth.loop.synthesize`), so
this module sits above the loop; :mod:`~dfq_deploy.synth.method` (the interface) sits below it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dfq_deploy.synth.base import CalibRequest, CalibSet, register_synthesizer
from dfq_deploy.synth.loop import synthesize
from dfq_deploy.synth.method import SynthMethod


def synth_method(name: str) -> Callable[[type[SynthMethod]], type[SynthMethod]]:
    """Register a :class:`SynthMethod` under ``name``, and as the calibration source ``--calib name``."""

    def deco(cls: type[SynthMethod]) -> type[SynthMethod]:
        cls.name = name

        def source(model: nn.Module, req: CalibRequest) -> CalibSet:
            options = dict(req.options)
            progress = bool(options.pop("progress", True))
            options.update(num_samples=req.num_samples, seed=req.seed)
            return synthesize(model, req.data_cfg, name, options, progress=progress).to_calib_set()

        source.__name__ = f"synthesize_{name}"
        source.__doc__ = f"``{name}``: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else name}"
        source.method = cls  # type: ignore[attr-defined]
        register_synthesizer(name)(source)
        return cls

    return deco
