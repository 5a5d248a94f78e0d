"""Energy measurement during a benchmark's timed window: the sources, and :func:`auto_sampler` that picks one.

The parts: :mod:`~dfq_deploy.bench.sampler` (the interface), :mod:`~dfq_deploy.bench.energy` (integration),
:mod:`~dfq_deploy.bench.jetson` (rails, INA3221), :mod:`~dfq_deploy.bench.tegrastats`, :mod:`~dfq_deploy.bench.nvml`,
:mod:`~dfq_deploy.bench.rapl`; their public names are re-exported here.


A sampler runs in a background thread between :meth:`PowerSampler.start` and :meth:`PowerSampler.stop`
and keeps time-stamped readings; :meth:`PowerSampler.energy` then integrates them over the time windows
(segments) in which one artifact ran, and returns joules, joules per image and average watts together with
the rail the figure comes from and the sampling rate. Nothing is ever made up: when no source is present the
result is ``{"available": False, "reason": ...}``.

Sources, tried in this order by :func:`auto_sampler`:

* :class:`INA3221Sampler`: Jetson on-module INA3221 monitors in sysfs (Jetson Linux / L4T >= 34):
  ``/sys/bus/i2c/devices/*/hwmon/hwmon*/in<N>_label``, ``in<N>_input`` (mV), ``curr<N>_input`` (mA).
  Channels labelled ``NC`` (not connected) and the "sum of shunt voltages" channel (``in7``) are skipped.
* :class:`TegrastatsSampler`: a ``tegrastats`` process started for the window (when the binary is on PATH),
  or :class:`TegrastatsLogSampler` for a log the user recorded (``tegrastats --interval 100 --logfile F``).
* :class:`dfq_deploy.bench.nvml.NVMLSampler`: desktop / server NVIDIA GPUs, NVML's total-energy counter
  differenced over the window (or its power readings integrated where the GPU has no counter), on the GPU
  with the CUDA device's PCI bus id.
* :class:`RAPLSampler`: ``/sys/class/powercap/*/energy_uj`` (CPU package energy), counter wrap handled with
  ``max_energy_range_uj``.

Which rail is "total":
    the board / module input rail when the board has one (``VDD_IN`` on Orin NX / Orin Nano / Xavier NX,
    ``VIN`` on Thor, ``POM_5V_IN`` on older boards). Jetson AGX Orin has no input rail: its rails are
    ``VDD_GPU_SOC`` (GPU and SoC share it), ``VDD_CPU_CV`` and ``VIN_SYS_5V0`` (the module's 5 V system / IO
    supply, *not* the board input), so the total there is the sum of the module rails and the result says so.
    The carrier board is never included. Every result carries ``rail`` and ``rail_note``.

Integration (:func:`integrate_power`):
    trapezoidal over the ``(t, watts)`` samples inside the window, with the power at the window edges
    linearly interpolated from the neighbouring samples. The part of a window that no pair of samples
    brackets is not extrapolated: it is reported as missing ``coverage``. Consecutive samples further apart
    than ``gap_factor`` (default 3) times the sampling interval are reported in ``gaps`` (they are still
    bridged by linear interpolation, so the figure is an estimate over them). Counter sources (NVML, RAPL)
    use :func:`energy_from_counter` instead: the difference of the counter, interpolated at the edges.

Times are wall-clock seconds (:func:`time.time`), so tegrastats logs with ``MM-DD-YYYY HH:MM:SS``
timestamps (local time) line up with the benchmark's segments.
"""


from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from dfq_deploy.bench.energy import (  # noqa: F401  (re-exported)
    DEFAULT_GAP_FACTOR,
    energy_from_counter,
    find_gaps,
    integrate_power,
    integrate_segments,
)
from dfq_deploy.bench.jetson import INA3221Sampler, find_ina3221_channels  # noqa: F401
from dfq_deploy.bench.rails import BOARD_INPUT_RAILS, GPU_RAILS, RAIL_NOTES, choose_total_rail, rail_note  # noqa: F401
from dfq_deploy.bench.rapl import RAPLSampler, find_rapl_zones, unwrap_counter  # noqa: F401
from dfq_deploy.bench.sampler import PowerSampler, UnavailableSampler, unavailable  # noqa: F401
from dfq_deploy.bench.tegrastats import (  # noqa: F401
    TegrastatsLogSampler,
    TegrastatsSampler,
    parse_tegrastats_file,
    parse_tegrastats_line,
    tegrastats_energy,
    tegrastats_times,
)
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)


def _nvml_sampler() -> PowerSampler:
    from dfq_deploy.bench.nvml import NVMLSampler

    return NVMLSampler()


def auto_sampler(tegrastats_log: str | Path | None = None, tegrastats_interval_ms: float = 1000.0,
                 sysfs_root: str | Path = "/sys", powercap_root: str | Path = "/sys/class/powercap",
                 candidates: Sequence[Callable[[], PowerSampler]] | None = None) -> PowerSampler:
    """The first available energy source, or an :class:`UnavailableSampler` that says why none is.

    Order: a given tegrastats log (the user asked for it), INA3221 sysfs, a live ``tegrastats``, NVML, RAPL.

    Args:
        tegrastats_log: a log recorded during the benchmark; used first when given.
        tegrastats_interval_ms: the interval that log was recorded with.
        sysfs_root: root for the INA3221 search.
        powercap_root: root for the RAPL search.
        candidates: factories to try instead of the defaults (tests).

    Raises:
        DfqError: ``tegrastats_log`` was given but does not exist.
    """
    if tegrastats_log is not None:
        s = TegrastatsLogSampler(tegrastats_log, tegrastats_interval_ms)
        reason = s.probe()
        if reason is not None:
            raise DfqError(f"{reason}: pass the file tegrastats --logfile wrote, or drop --tegrastats-log")
        return s
    if candidates is None:
        candidates = (
            lambda: INA3221Sampler(sysfs_root),
            lambda: TegrastatsSampler(),
            _nvml_sampler,
            lambda: RAPLSampler(powercap_root),
        )
    reasons = []
    for make in candidates:
        sampler = make()
        reason = sampler.probe()
        if reason is None:
            logger.info("energy source: %s (%s)", sampler.source, sampler.total or "total")
            return sampler
        reasons.append(f"{sampler.source}: {reason}")
    return UnavailableSampler("no energy source on this machine (" + "; ".join(reasons) + ")")
