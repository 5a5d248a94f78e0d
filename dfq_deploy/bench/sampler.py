"""The sampler interface every energy source implements: a background thread of time-stamped readings between
:meth:`PowerSampler.start` and :meth:`PowerSampler.stop`, integrated per segment by :meth:`PowerSampler.energy`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfq_deploy.bench.energy import DEFAULT_GAP_FACTOR, integrate_segments
from dfq_deploy.bench.rails import GPU_RAILS, rail_note
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


def unavailable(reason: str) -> dict[str, Any]:
    """The energy result when nothing could be measured."""
    return {"available": False, "reason": reason}


class PowerSampler:
    """Background sampler of one power source; subclasses implement :meth:`probe` and :meth:`read`.

    ``kind`` is ``"power"`` when :meth:`read` returns watts per channel, ``"counter"`` when it returns
    cumulative joules per channel. The channel named :attr:`total` is the one reported as the headline
    figure; the others are reported per rail.

    Args:
        interval_s: time between readings in the background thread.
        gap_factor: spacings above ``gap_factor * interval_s`` are reported as gaps.
    """

    source = "none"
    kind = "power"

    def __init__(self, interval_s: float = 0.05, gap_factor: float = DEFAULT_GAP_FACTOR) -> None:
        self.interval_s = float(interval_s)
        self.gap_factor = gap_factor
        self.total = ""
        self.total_note = ""
        self.times: list[float] = []
        self.values: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._read_errors = 0
        #: exception types a failed reading raises (a sampler adds its library's, e.g. ``pynvml.NVMLError``)
        self.read_error_types: tuple[type[BaseException], ...] = (OSError, ValueError)

    # -- to implement ----------------------------------------------------------------------------------
    def probe(self) -> str | None:
        """``None`` when the source can be read here, else the reason it cannot."""
        raise NotImplementedError

    def read(self) -> dict[str, float]:
        """One reading: ``{channel: watts}`` ("power") or ``{channel: joules so far}`` ("counter")."""
        raise NotImplementedError

    # -- common ----------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.probe() is None

    def _sample(self) -> None:
        try:
            reading = self.read()
        except self.read_error_types as exc:
            self._read_errors += 1
            if self._read_errors == 1:
                logger.warning("%s: reading failed (%s); the sample is dropped", self.source, exc)
            return
        now = time.time()
        with self._lock:
            self.times.append(now)
            self.values.append(reading)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        """Take a first reading and start the background thread.

        Raises:
            DfqError: the source is not available here.
        """
        reason = self.probe()
        if reason is not None:
            raise DfqError(f"{self.source} power sampler is not available: {reason}")
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name=f"dfq-power-{self.source}", daemon=True)
        self._thread.start()
        logger.debug("%s sampler started (every %.3f s)", self.source, self.interval_s)

    def stop(self) -> None:
        """Stop the thread and take a last reading, so the end of the window is bracketed."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()

    def __enter__(self) -> PowerSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def series(self, channel: str) -> tuple[np.ndarray, np.ndarray]:
        """``(times, values)`` of one channel (samples that lack it are left out)."""
        with self._lock:
            pairs = [(t, v[channel]) for t, v in zip(self.times, self.values, strict=True) if channel in v]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        t, v = zip(*pairs, strict=True)
        return np.asarray(t, dtype=np.float64), np.asarray(v, dtype=np.float64)

    def channels(self) -> list[str]:
        with self._lock:
            names: dict[str, None] = {}
            for v in self.values:
                names.update(dict.fromkeys(v))
        return list(names)

    def sample_rate_hz(self) -> float | None:
        """Readings per second actually achieved."""
        with self._lock:
            if len(self.times) < 2 or self.times[-1] <= self.times[0]:
                return None
            return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def trace(self) -> dict[str, Any]:
        """The raw readings: ``{"kind", "t": [...], "channels": {name: [value or None, ...]}}``.

        Values are watts for kind "power" and cumulative joules for kind "counter".
        """
        names = self.channels()
        with self._lock:
            return {"kind": self.kind, "t": list(self.times),
                    "channels": {n: [v.get(n) for v in self.values] for n in names}}

    def describe(self) -> dict[str, Any]:
        """Source, rail and sampling figures, for the report."""
        return {
            "available": True,
            "source": self.source,
            "kind": self.kind,
            "rail": self.total,
            "rail_note": self.total_note,
            "interval_s": self.interval_s,
            "sample_rate_hz": self.sample_rate_hz(),
            "n_samples": len(self.times),
            "gap_factor": self.gap_factor,
            "warnings": list(self.warnings),
        }

    def energy(self, segments: Sequence[tuple[float, float]], images: int) -> dict[str, Any]:
        """Energy over ``segments`` (wall-clock windows in which one artifact ran ``images`` images).

        Returns:
            ``available``, ``source``, ``rail``, ``rail_note``, ``joules``, ``joules_per_image``,
            ``avg_watts``, ``window_s``, ``coverage``, ``sample_rate_hz``, ``gaps``, ``per_rail`` and
            ``warnings``; or ``{"available": False, "reason": ...}``.
        """
        if not self.times:
            return unavailable(f"{self.source}: no samples were taken (was the sampler started?)")
        t, v = self.series(self.total)
        res = integrate_segments(t, v, segments, self.kind, self.interval_s, self.gap_factor)
        if res["joules"] is None:
            return unavailable(f"{self.source}: {res.get('reason', 'no samples in the window')}")
        rate = self.sample_rate_hz()
        warnings = list(self.warnings)
        if res["coverage"] < 0.99:
            warnings.append(f"samples cover only {100 * res['coverage']:.0f}% of the timed window")
        if res["gaps"]:
            warnings.append(f"{len(res['gaps'])} sampling gap(s) longer than {self.gap_factor:g}x the "
                            f"interval ({res['gap_s']:.2f} s of the window bridged by interpolation)")
        seg_lengths = [b - a for a, b in segments]
        if rate and seg_lengths and float(np.median(seg_lengths)) < 2.0 / rate:
            warnings.append("timed segments are shorter than two sampling intervals: energy is interpolated "
                            "and blurs between interleaved artifacts (use --seconds with longer runs)")
        per_rail = {}
        for ch in self.channels():
            if ch == self.total:
                continue
            ct, cv = self.series(ch)
            r = integrate_segments(ct, cv, segments, self.kind, self.interval_s, self.gap_factor)
            if r["joules"] is not None:
                per_rail[ch] = {"joules": r["joules"], "avg_watts": r["avg_watts"],
                                "joules_per_image": r["joules"] / images if images else None,
                                "note": rail_note(ch)}
        return {
            "available": True,
            "source": self.source,
            "rail": self.total,
            "rail_note": self.total_note,
            "joules": res["joules"],
            "joules_per_image": res["joules"] / images if images else None,
            "avg_watts": res["avg_watts"],
            "images": images,
            "window_s": res["window_s"],
            "covered_s": res["covered_s"],
            "coverage": res["coverage"],
            "n_samples": res["n_samples"],
            "sample_rate_hz": rate,
            "gaps": res["gaps"],
            "gap_s": res["gap_s"],
            "per_rail": per_rail,
            "gpu_rail": next((r for r in GPU_RAILS if r in per_rail), None),
            "warnings": warnings,
        }


class UnavailableSampler(PowerSampler):
    """Stands in when no source exists; every energy result says why."""

    source = "unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def probe(self) -> str | None:
        return self.reason

    def read(self) -> dict[str, float]:
        raise OSError(self.reason)

    def start(self) -> None:
        logger.info("energy not measured: %s", self.reason)

    def stop(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return unavailable(self.reason)

    def energy(self, segments: Sequence[tuple[float, float]], images: int) -> dict[str, Any]:
        return unavailable(self.reason)


# -- Jetson INA3221 ------------------------------------------------------------------------------------------
