"""Calibration sources: data-free synthesizers and the real-data baseline, behind one registry.

Each source is one module that registers a function with :func:`register_synthesizer`; importing this
package imports them all. A source returns a :class:`CalibSet` of images in the model's normalised space.

The optimisation-based synthesizers (``psaq``, ``spdfq``, ``dfqvit``) share one loop
(:mod:`~dfq_deploy.synth.loop`); :func:`synthesize_to_dir` runs one into an output folder with checkpoints,
and :func:`load_synth_dir` reads such a folder back as a :class:`CalibSet`.
"""

from dfq_deploy.synth import dfqvit, noise, psaq, real, spdfq  # noqa: F401,E402  (registration side effects)
from dfq_deploy.synth.base import SOURCES, CalibRequest, CalibSet, get_source, register_synthesizer
from dfq_deploy.synth.loop import SynthResult, synthesize
from dfq_deploy.synth.method import METHODS, method_options
from dfq_deploy.synth.options import SynthOptions
from dfq_deploy.synth.run import calibration_set, load_synth_dir, synthesize_default, synthesize_to_dir

__all__ = [
    "METHODS",
    "SOURCES",
    "CalibRequest",
    "CalibSet",
    "SynthOptions",
    "SynthResult",
    "calibration_set",
    "get_source",
    "load_synth_dir",
    "method_options",
    "register_synthesizer",
    "synthesize_to_dir",
    "synthesize_default",
    "synthesize",
]
