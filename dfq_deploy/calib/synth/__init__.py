"""Calibration sources: data-free synthesizers and the real-data baseline, behind one registry.

Each source is one module that registers a function with :func:`register_synthesizer`; importing this
package imports them all. A source returns a :class:`CalibSet` of images in the model's normalised space.
"""

from dfq_deploy.calib.synth import noise, real  # noqa: F401,E402  (registration side effects)
from dfq_deploy.calib.synth.base import SYNTHESIZERS, CalibRequest, CalibSet, get_source, register_synthesizer

__all__ = ["SYNTHESIZERS", "CalibRequest", "CalibSet", "get_source", "register_synthesizer"]
