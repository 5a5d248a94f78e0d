"""Energy measurement during a benchmark's timed window.

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
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

#: Consecutive samples further apart than this many sampling intervals are reported as a gap.
DEFAULT_GAP_FACTOR = 3.0

#: Board / module input rails, best first: their reading is the whole module's power.
BOARD_INPUT_RAILS = ("VDD_IN", "VIN", "POM_5V_IN", "5V_IN")

#: What a rail powers, for the reports (names from the Jetson Linux developer guide and tegrastats output).
RAIL_NOTES: dict[str, str] = {
    "VDD_IN": "module input rail (whole module; carrier board not included)",
    "VIN": "board input rail (Thor: whole board input)",
    "POM_5V_IN": "module 5 V input rail (whole module)",
    "5V_IN": "module 5 V input rail (whole module)",
    "VDD_GPU_SOC": "shared GPU + SoC rail (AGX Orin), not whole-board power",
    "VDD_CPU_CV": "CPU + CV accelerators rail (AGX Orin)",
    "VIN_SYS_5V0": "5 V system / IO rail, not the board input",
    "VDDQ_VDD2_1V8AO": "DRAM / always-on 1.8 V rail (AGX Orin)",
    "VDD_CPU_GPU_CV": "shared CPU + GPU + CV rail (Orin NX / Orin Nano)",
    "VDD_SOC": "SoC rail (Orin NX / Orin Nano)",
    "VDD_GPU": "GPU rail (Thor)",
    "VDD_CPU_SOC_MSS": "shared CPU + SoC + memory subsystem rail (Thor)",
}

#: Rails that carry the GPU, best (GPU-only) first.
GPU_RAILS = ("VDD_GPU", "VDD_GPU_SOC", "VDD_CPU_GPU_CV")


def rail_note(name: str) -> str:
    """What ``name`` powers, or ``""`` when unknown."""
    return RAIL_NOTES.get(name, "")


def choose_total_rail(names: Iterable[str]) -> tuple[str, str, list[str]]:
    """Pick the rail that stands for total power.

    Args:
        names: rail names present on the board (``NC`` and sum channels already removed).

    Returns:
        ``(total name, note, rails it sums)``: the board-input rail when present, else
        ``"sum(A+B+...)"`` over every rail, with a note that says what is and is not included.
    """
    names = [n for n in names if n]
    for rail in BOARD_INPUT_RAILS:
        if rail in names:
            return rail, RAIL_NOTES[rail], [rail]
    if not names:
        return "", "", []
    total = "sum(" + "+".join(names) + ")"
    return total, "sum of the module rails: this board has no input rail; carrier board not included", names


# ----------------------------------------------------------------------------------------------------------
# Integration
# ----------------------------------------------------------------------------------------------------------


def _sorted(times: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.shape != v.shape or t.ndim != 1:
        raise ValueError(f"times and values must be 1-D of equal length, got {t.shape} and {v.shape}")
    keep = np.isfinite(t) & np.isfinite(v)
    t, v = t[keep], v[keep]
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def find_gaps(times: Sequence[float], t0: float, t1: float, interval_s: float | None = None,
              gap_factor: float = DEFAULT_GAP_FACTOR) -> list[dict[str, float]]:
    """Intervals between consecutive samples longer than ``gap_factor`` x the sampling interval.

    Args:
        times: sample times (s).
        t0: window start (s); only gaps overlapping ``[t0, t1]`` are returned.
        t1: window end (s).
        interval_s: nominal sampling interval; the median spacing of ``times`` when ``None``.
        gap_factor: the ``k`` in "longer than k x the interval".

    Returns:
        ``[{"start": s, "end": s, "seconds": length inside the window}, ...]``.
    """
    t = np.sort(np.asarray(times, dtype=np.float64))
    if len(t) < 2:
        return []
    dt = np.diff(t)
    nominal = interval_s if interval_s else float(np.median(dt))
    if nominal <= 0:
        return []
    gaps = []
    for i in np.nonzero(dt > gap_factor * nominal)[0]:
        a, b = float(t[i]), float(t[i + 1])
        overlap = min(b, t1) - max(a, t0)
        if overlap > 0:
            gaps.append({"start": a, "end": b, "seconds": overlap})
    return gaps


def integrate_power(times: Sequence[float], watts: Sequence[float], t0: float | None = None,
                    t1: float | None = None, interval_s: float | None = None,
                    gap_factor: float = DEFAULT_GAP_FACTOR) -> dict[str, Any]:
    """Energy in ``[t0, t1]`` from power samples, by the trapezoidal rule.

    The power at ``t0`` and ``t1`` is linearly interpolated between the neighbouring samples. The part of
    the window before the first or after the last sample is not extrapolated and shows as ``coverage < 1``.

    Args:
        times: sample times (s), any order.
        watts: power at each time (W).
        t0: window start (s); the first sample when ``None``.
        t1: window end (s); the last sample when ``None``.
        interval_s: nominal sampling interval, for gap detection (median spacing when ``None``).
        gap_factor: spacings above ``gap_factor * interval_s`` are reported in ``gaps``.

    Returns:
        ``joules`` (``None`` when no two samples bracket any part of the window), ``window_s``,
        ``covered_s``, ``coverage`` (covered / window), ``avg_watts`` (over the covered part), ``n_samples``
        (inside the window), ``gaps`` and ``gap_s``.
    """
    return _energy_in_window(times, watts, t0, t1, interval_s, gap_factor, _trapezoid_joules)


def energy_from_counter(times: Sequence[float], joules_cumulative: Sequence[float], t0: float | None = None,
                        t1: float | None = None, interval_s: float | None = None,
                        gap_factor: float = DEFAULT_GAP_FACTOR) -> dict[str, Any]:
    """Energy in ``[t0, t1]`` from a cumulative energy counter (already unwrapped, in J).

    The counter is linearly interpolated at the window edges; the result has the same keys as
    :func:`integrate_power`.
    """
    return _energy_in_window(times, joules_cumulative, t0, t1, interval_s, gap_factor, _counter_joules)


def _trapezoid_joules(t: np.ndarray, w: np.ndarray, ca: float, cb: float) -> float:
    """Trapezoidal integral of power samples over ``[ca, cb]``, interpolated at the edges."""
    inside = (t > ca) & (t < cb)
    tt = np.concatenate([[ca], t[inside], [cb]])
    ww = np.concatenate([[np.interp(ca, t, w)], w[inside], [np.interp(cb, t, w)]])
    return float(np.sum(0.5 * (ww[1:] + ww[:-1]) * np.diff(tt)))


def _counter_joules(t: np.ndarray, e: np.ndarray, ca: float, cb: float) -> float:
    """Difference of a cumulative energy counter over ``[ca, cb]``, interpolated at the edges."""
    return float(np.interp(cb, t, e) - np.interp(ca, t, e))


def _energy_in_window(times: Sequence[float], values: Sequence[float], t0: float | None, t1: float | None,
                      interval_s: float | None, gap_factor: float,
                      joules_fn: Callable[[np.ndarray, np.ndarray, float, float], float]) -> dict[str, Any]:
    """The window logic shared by power samples and energy counters: bounds, coverage, gaps."""
    t, v = _sorted(times, values)
    if len(t) == 0:
        a = t0 or 0.0
        return _empty_window(a, t1 if t1 is not None else a, "no samples")
    a = float(t[0]) if t0 is None else float(t0)
    b = float(t[-1]) if t1 is None else float(t1)
    if b < a:
        raise ValueError(f"window end {b} is before its start {a}")
    ca, cb = max(a, float(t[0])), min(b, float(t[-1]))
    n_in = int(np.count_nonzero((t >= a) & (t <= b)))
    if len(t) < 2 or cb <= ca:
        out = _empty_window(a, b, "no pair of samples brackets the window")
        out["n_samples"] = n_in
        return out
    return _window_result(joules_fn(t, v, ca, cb), a, b, cb - ca, n_in, find_gaps(t, a, b, interval_s, gap_factor))


def _window_result(joules: float, a: float, b: float, covered: float, n_in: int,
                   gaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The common result of an energy window ``[a, b]`` of which ``covered`` seconds had samples."""
    return {
        "joules": joules,
        "window_s": b - a,
        "covered_s": covered,
        "coverage": covered / (b - a) if b > a else 1.0,
        "avg_watts": joules / covered,
        "n_samples": n_in,
        "gaps": gaps,
        "gap_s": float(sum(g["seconds"] for g in gaps)),
    }


def _empty_window(a: float, b: float, reason: str) -> dict[str, Any]:
    return {"joules": None, "window_s": b - a, "covered_s": 0.0, "coverage": 0.0, "avg_watts": None,
            "n_samples": 0, "gaps": [], "gap_s": 0.0, "reason": reason}


def integrate_segments(times: Sequence[float], values: Sequence[float],
                       segments: Sequence[tuple[float, float]], kind: str = "power",
                       interval_s: float | None = None,
                       gap_factor: float = DEFAULT_GAP_FACTOR) -> dict[str, Any]:
    """Sum of :func:`integrate_power` (``kind="power"``) or :func:`energy_from_counter` over several windows.

    Returns:
        the keys of :func:`integrate_power` summed over the windows (``joules`` is ``None`` when no window
        could be integrated at all); ``gaps`` lists each gap once.
    """
    one = integrate_power if kind == "power" else energy_from_counter
    parts = [one(times, values, a, b, interval_s, gap_factor) for a, b in segments]
    window = sum(p["window_s"] for p in parts)
    covered = sum(p["covered_s"] for p in parts)
    done = [p for p in parts if p["joules"] is not None]
    joules = float(sum(p["joules"] for p in done)) if done else None
    gaps: dict[float, dict[str, float]] = {}
    for p in parts:
        for g in p["gaps"]:
            prev = gaps.setdefault(g["start"], {"start": g["start"], "end": g["end"], "seconds": 0.0})
            prev["seconds"] += g["seconds"]
    out = {
        "joules": joules,
        "window_s": window,
        "covered_s": covered,
        "coverage": covered / window if window > 0 else 0.0,
        "avg_watts": joules / covered if joules is not None and covered > 0 else None,
        "n_samples": int(sum(p["n_samples"] for p in parts)),
        "gaps": sorted(gaps.values(), key=lambda g: g["start"]),
        "gap_s": float(sum(g["seconds"] for g in gaps.values())),
        "segments": len(parts),
    }
    if joules is None:
        out["reason"] = "no pair of samples brackets any of the windows"
    return out


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _is_nc(label: str) -> bool:
    return re.fullmatch(r"NC(\b.*)?", label.strip(), flags=re.IGNORECASE) is not None


def find_ina3221_channels(root: str | Path = "/sys") -> list[dict[str, Any]]:
    """INA3221 channels under ``ROOT/bus/i2c/devices/*/hwmon/hwmon*`` (the L4T >= 34 hwmon layout).

    A hwmon folder counts when its ``name`` file, or the I2C device's, contains ``ina3221``. Channels
    labelled ``NC`` and the "sum of shunt voltages" channel (``in7``) are skipped, and so are channels
    without both ``in<N>_input`` and ``curr<N>_input``.

    Returns:
        ``[{"label", "volt", "curr", "hwmon", "update_interval_ms"}, ...]`` sorted by hwmon folder, channel.
    """
    base = Path(root) / "bus" / "i2c" / "devices"
    found: list[dict[str, Any]] = []
    for hw in sorted(base.glob("*/hwmon/hwmon*")):
        names = [_read_text(hw / "name"), _read_text(hw.parent.parent / "name")]
        if not any(n and "ina3221" in n.lower() for n in names):
            continue
        update = _read_text(hw / "update_interval")
        for label_file in sorted(hw.glob("in*_label"), key=lambda p: p.name):
            m = re.fullmatch(r"in(\d+)_label", label_file.name)
            if not m:
                continue
            n = int(m.group(1))
            label = _read_text(label_file) or ""
            if not label or _is_nc(label):
                logger.debug("skipped not-connected channel %s", label_file)
                continue
            if "sum of shunt" in label.lower() or n == 7:
                logger.debug("skipped sum-of-shunts channel %s", label_file)
                continue
            volt, curr = hw / f"in{n}_input", hw / f"curr{n}_input"
            if not (volt.is_file() and curr.is_file()):
                logger.debug("channel %s has no in/curr input files", label_file)
                continue
            found.append({"label": label, "volt": volt, "curr": curr, "hwmon": hw,
                          "update_interval_ms": int(update) if update and update.isdigit() else None})
    # Labels must be unique channel names: qualify repeats with their I2C device.
    counts: dict[str, int] = {}
    for ch in found:
        counts[ch["label"]] = counts.get(ch["label"], 0) + 1
    for ch in found:
        device = ch["hwmon"].parent.parent.name
        ch["name"] = ch["label"] if counts[ch["label"]] == 1 else f"{ch['label']}@{device}"
    return found


class INA3221Sampler(PowerSampler):
    """Jetson INA3221 rails from sysfs: power = bus voltage (mV) x current (mA).

    Args:
        root: the sysfs root (``/sys``; tests pass a fake tree).
        interval_s: reading period. The sensor itself averages over ``update_interval`` ms (reported as
            ``sensor_update_interval_ms``; 430 ms by default on Orin), so faster readings repeat values.
    """

    source = "ina3221"

    def __init__(self, root: str | Path = "/sys", interval_s: float = 0.05,
                 gap_factor: float = DEFAULT_GAP_FACTOR) -> None:
        super().__init__(interval_s, gap_factor)
        self.root = Path(root)
        self._channels = find_ina3221_channels(self.root)
        self.total, self.total_note, self._summed = choose_total_rail([c["name"] for c in self._channels])

    def probe(self) -> str | None:
        if not self._channels:
            return (f"no INA3221 hwmon channels under {self.root}/bus/i2c/devices/*/hwmon "
                    "(not a Jetson, or Jetson Linux older than L4T 34)")
        try:
            self.read()
        except (OSError, ValueError) as exc:
            return f"INA3221 channels are not readable: {exc}"
        return None

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for ch in self._channels:
            mv = int(ch["volt"].read_text().split()[0])
            ma = int(ch["curr"].read_text().split()[0])
            out[ch["name"]] = mv * ma / 1e6
        if self.total not in out:
            out[self.total] = float(sum(out[n] for n in self._summed))
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["rails"] = [c["name"] for c in self._channels]
        intervals = {c["update_interval_ms"] for c in self._channels if c["update_interval_ms"]}
        d["sensor_update_interval_ms"] = max(intervals) if intervals else None
        return d


# -- tegrastats ----------------------------------------------------------------------------------------------

_TS_RE = re.compile(r"^\s*(\d{2})-(\d{2})-(\d{4}) (\d{2}):(\d{2}):(\d{2})\b")
_RAIL_RE = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(-?\d+)mW(?:/(-?\d+)mW)?(?:/(-?\d+)mW)?")
_GR3D_RE = re.compile(r"\bGR3D_FREQ\s+(?:(\d+)%)?(?:@\[?([\d,\s]+)\]?)?")
_TEMP_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB")


def parse_tegrastats_line(line: str) -> dict[str, Any]:
    """Fields of one tegrastats line that matter for energy.

    Handles JetPack 5/6 rails (``NAME <inst>mW/<avg>mW``), JetPack 7 rails
    (``NAME <inst>mW/<avg>mW/<max>mW``), negative readings (an offset-calibrated idle rail), ``NC`` channels
    (dropped), and the GPU load forms
    ``GR3D_FREQ 10%@1300`` (JetPack 6), ``GR3D_FREQ 12%@[1300,1300]`` (JetPack 7, one clock per GPC) and
    ``GR3D_FREQ @[1000,1000,1000]`` (Thor, no load figure). A leading ``MM-DD-YYYY HH:MM:SS`` is read as
    local time.

    Returns:
        ``{"timestamp": epoch s or None, "rails": {name: {"mw", "avg_mw", "max_mw"}}, "gpu_load_pct",
        "gpu_freq_mhz": [per-GPC MHz], "temps_c": {...}, "ram_mb": [used, total] or None}``. The
        instantaneous ``mw`` is what energy uses; ``avg_mw`` / ``max_mw`` are tegrastats' running figures.
    """
    out: dict[str, Any] = {"timestamp": None, "rails": {}, "gpu_load_pct": None, "gpu_freq_mhz": [],
                           "temps_c": {}, "ram_mb": None}
    m = _TS_RE.match(line)
    if m:
        mo, d, y, hh, mm, ss = (int(g) for g in m.groups())
        out["timestamp"] = datetime(y, mo, d, hh, mm, ss).timestamp()
    for name, inst, avg, mx in _RAIL_RE.findall(line):
        if _is_nc(name):
            continue
        out["rails"][name] = {"mw": int(inst), "avg_mw": int(avg) if avg else None,
                              "max_mw": int(mx) if mx else None}
    g = _GR3D_RE.search(line)
    if g:
        out["gpu_load_pct"] = int(g.group(1)) if g.group(1) is not None else None
        if g.group(2):
            out["gpu_freq_mhz"] = [int(f) for f in g.group(2).replace(" ", "").split(",") if f]
    # -256 C is what tegrastats prints for a powered-down sensor.
    out["temps_c"] = {k: float(v) for k, v in _TEMP_RE.findall(line) if float(v) > -200}
    r = _RAM_RE.search(line)
    if r:
        out["ram_mb"] = [int(r.group(1)), int(r.group(2))]
    return out


def tegrastats_times(parsed: Sequence[dict[str, Any]], interval_ms: float = 1000.0,
                     anchor_end: float | None = None) -> np.ndarray:
    """Wall-clock time of each parsed line.

    With timestamps (1 s resolution), lines that share a second are spread through it by the interval
    (``k * min(interval, 1 s / count)``). Without timestamps, line ``i`` of ``n`` is placed at
    ``anchor_end - (n - 1 - i) * interval``.

    Raises:
        DfqError: no timestamps and no ``anchor_end``.
    """
    n = len(parsed)
    stamps = [p["timestamp"] for p in parsed]
    step = interval_ms / 1000.0
    if n and all(s is not None for s in stamps):
        times = np.zeros(n)
        i = 0
        while i < n:
            j = i
            while j < n and stamps[j] == stamps[i]:
                j += 1
            k = j - i
            spacing = min(step, 1.0 / k)
            for q in range(k):
                times[i + q] = stamps[i] + q * spacing
            i = j
        return times
    if anchor_end is None:
        raise DfqError("the tegrastats log has lines without timestamps and no anchor time: record it with a "
                       "recent tegrastats (which prefixes MM-DD-YYYY HH:MM:SS) or keep it being written")
    return anchor_end - (n - 1 - np.arange(n)) * step


def parse_tegrastats_file(path: str | Path, interval_ms: float = 1000.0,
                          anchor_end: float | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Parse a tegrastats log into ``(times, parsed lines)`` (lines with no rail reading are skipped).

    Args:
        path: the log (``tegrastats --interval MS --logfile PATH``).
        interval_ms: the ``--interval`` it was recorded with (tegrastats' default is 1000 ms).
        anchor_end: time of the last line for logs without timestamps; the file's modification time
            when ``None`` (tegrastats appends a line per interval, so mtime is the last line's time).

    Raises:
        DfqError: the file is missing or has no rail readings.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DfqError(f"cannot read tegrastats log {path}: {exc.strerror} (pass an existing "
                       "--tegrastats-log recorded with tegrastats --logfile)") from exc
    parsed = [p for p in (parse_tegrastats_line(ln) for ln in text.splitlines() if ln.strip()) if p["rails"]]
    if not parsed:
        raise DfqError(f"{path} has no tegrastats power rail readings "
                       "(expected fields like 'VDD_IN 4406mW/4406mW'): pass a tegrastats log")
    if anchor_end is None and any(p["timestamp"] is None for p in parsed):
        anchor_end = path.stat().st_mtime
    return tegrastats_times(parsed, interval_ms, anchor_end), parsed


def tegrastats_energy(times: Sequence[float], parsed: Sequence[dict[str, Any]], t0: float, t1: float,
                      interval_ms: float = 1000.0, gap_factor: float = DEFAULT_GAP_FACTOR) -> dict[str, Any]:
    """Energy over ``[t0, t1]`` from parsed tegrastats lines, using instantaneous rail values.

    Returns:
        :func:`integrate_power`'s keys for the total rail plus ``rail``, ``rail_note`` and ``per_rail``.
    """
    total, note, summed = choose_total_rail(_rail_names(parsed))
    watts = _rail_watts(parsed, total, summed)
    res = integrate_power(times, watts, t0, t1, interval_ms / 1000.0, gap_factor)
    res.update(rail=total, rail_note=note, per_rail={})
    for name in _rail_names(parsed):
        if name != total:
            w = _rail_watts(parsed, name, [name])
            r = integrate_power(times, w, t0, t1, interval_ms / 1000.0, gap_factor)
            res["per_rail"][name] = {"joules": r["joules"], "avg_watts": r["avg_watts"],
                                     "note": rail_note(name)}
    return res


def _rail_names(parsed: Sequence[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for p in parsed:
        names.update(dict.fromkeys(p["rails"]))
    return list(names)


def _rail_watts(parsed: Sequence[dict[str, Any]], total: str, summed: Sequence[str]) -> np.ndarray:
    out = []
    for p in parsed:
        rails = p["rails"]
        if total in rails:
            out.append(rails[total]["mw"] / 1000.0)
        elif all(n in rails for n in summed):
            out.append(sum(rails[n]["mw"] for n in summed) / 1000.0)
        else:
            out.append(np.nan)
    return np.asarray(out, dtype=np.float64)


def _tegrastats_reading(parsed: dict[str, Any], total: str, summed: Sequence[str]) -> dict[str, float]:
    reading = {n: r["mw"] / 1000.0 for n, r in parsed["rails"].items()}
    if total and total not in reading and all(n in reading for n in summed):
        reading[total] = sum(reading[n] for n in summed)
    return reading


class TegrastatsLogSampler(PowerSampler):
    """Energy from a tegrastats log recorded alongside the benchmark (the fallback when sysfs is closed).

    :meth:`start` / :meth:`stop` only note the window; the log is parsed when energy is asked for, so the
    log must cover the benchmark (start ``tegrastats --interval 100 --logfile F`` before it).

    Args:
        path: the log file.
        interval_ms: the ``--interval`` used (default 1000 ms, tegrastats' own default).
    """

    source = "tegrastats-log"

    def __init__(self, path: str | Path, interval_ms: float = 1000.0,
                 gap_factor: float = DEFAULT_GAP_FACTOR) -> None:
        super().__init__(interval_ms / 1000.0, gap_factor)
        self.path = Path(path)
        self.interval_ms = interval_ms
        self._loaded = False

    def probe(self) -> str | None:
        return None if self.path.is_file() else f"tegrastats log {self.path} does not exist"

    def read(self) -> dict[str, float]:
        raise OSError("a tegrastats log is parsed, not polled")

    def start(self) -> None:
        reason = self.probe()
        if reason is not None:
            raise DfqError(f"{reason} (start tegrastats --logfile before the benchmark)")
        self._loaded = False

    def stop(self) -> None:
        return None

    def load(self) -> None:
        """(Re)read the log into :attr:`times` / :attr:`values`."""
        times, parsed = parse_tegrastats_file(self.path, self.interval_ms)
        self.total, self.total_note, summed = choose_total_rail(_rail_names(parsed))
        with self._lock:
            self.times = [float(t) for t in times]
            self.values = [_tegrastats_reading(p, self.total, summed) for p in parsed]
        self._loaded = True

    def energy(self, segments: Sequence[tuple[float, float]], images: int) -> dict[str, Any]:
        if not self._loaded:
            self.load()
        res = super().energy(segments, images)
        if res.get("available") and res["n_samples"] == 0 and res["coverage"] > 0:
            res["warnings"].append("no tegrastats line falls inside the window: the figure is interpolated "
                                   "between the lines around it")
        elif not res.get("available") and self.times:
            res["reason"] = (f"tegrastats log {self.path} covers {_fmt_time(self.times[0])} to "
                             f"{_fmt_time(self.times[-1])}, not the benchmark window "
                             "(record it during the run)")
        return res

    def describe(self) -> dict[str, Any]:
        if not self._loaded and self.path.is_file():
            try:
                self.load()
            except DfqError as exc:
                return unavailable(str(exc))
        d = super().describe()
        d.update(path=str(self.path), interval_ms=self.interval_ms)
        return d


def _fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


class TegrastatsSampler(PowerSampler):
    """Runs ``tegrastats --interval MS`` for the window and stamps each line on arrival.

    Only the process this sampler started is stopped (terminate, then kill after 2 s).
    """

    source = "tegrastats"

    def __init__(self, interval_ms: int = 100, binary: str = "tegrastats",
                 gap_factor: float = DEFAULT_GAP_FACTOR) -> None:
        super().__init__(interval_ms / 1000.0, gap_factor)
        self.interval_ms = int(interval_ms)
        self.binary = binary
        self._proc: subprocess.Popen[str] | None = None

    def probe(self) -> str | None:
        return None if shutil.which(self.binary) else f"{self.binary} is not on PATH (not a Jetson)"

    def read(self) -> dict[str, float]:
        raise OSError("tegrastats lines are pushed, not polled")

    def _reader(self, proc: subprocess.Popen[str]) -> None:
        summed: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            parsed = parse_tegrastats_line(line)
            if not parsed["rails"]:
                continue
            if not self.total:
                self.total, self.total_note, summed = choose_total_rail(list(parsed["rails"]))
            with self._lock:
                self.times.append(now)
                self.values.append(_tegrastats_reading(parsed, self.total, summed))

    def start(self) -> None:
        reason = self.probe()
        if reason is not None:
            raise DfqError(f"tegrastats power sampler is not available: {reason}")
        self._proc = subprocess.Popen([self.binary, "--interval", str(self.interval_ms)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._reader, args=(self._proc,), daemon=True,
                                        name="dfq-power-tegrastats")
        self._thread.start()
        # Wait for a first line so the window's start is bracketed.
        deadline = time.time() + max(2.0, 3 * self.interval_ms / 1000.0)
        while not self.times and time.time() < deadline and self._proc.poll() is None:
            time.sleep(0.01)

    def stop(self) -> None:
        if self._proc is None:
            return
        # One more interval so the end of the window is bracketed too.
        time.sleep(self.interval_ms / 1000.0 * 1.5)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._proc, self._thread = None, None


# -- RAPL ------------------------------------------------------------------------------------------------


def find_rapl_zones(root: str | Path = "/sys/class/powercap") -> list[dict[str, Any]]:
    """RAPL zones with a readable ``energy_uj`` under ``root``.

    Returns:
        ``[{"name", "path", "max_uj", "top": bool}]``; sub-zones (``intel-rapl:0:1``) are named
        ``<parent name>/<name>`` and have ``top=False``.
    """
    root = Path(root)
    zones = []
    for d in sorted(root.glob("*")):
        energy = d / "energy_uj"
        if not energy.is_file():
            continue
        parts = d.name.split(":")
        if len(parts) < 2:  # the "intel-rapl" control type folder itself
            continue
        name = _read_text(d / "name") or d.name
        top = len(parts) == 2
        if not top:
            parent = _read_text(root / ":".join(parts[:2]) / "name")
            name = f"{parent or ':'.join(parts[:2])}/{name}"
        mx = _read_text(d / "max_energy_range_uj")
        zones.append({"name": name, "path": energy, "max_uj": int(mx) if mx and mx.isdigit() else None,
                      "top": top, "dir": d.name})
    return zones


def unwrap_counter(raw: Sequence[float], max_range: float | None) -> np.ndarray:
    """Cumulative values of a counter that wraps to 0 after ``max_range`` (a drop adds ``max_range``).

    Returns:
        the counter with the wraps undone, starting at ``raw[0]``. Without ``max_range`` a drop raises.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if len(raw) == 0:
        return raw
    d = np.diff(raw)
    if np.any(d < 0):
        if not max_range:
            raise ValueError("the energy counter went backwards and max_energy_range_uj is unknown")
        d = np.where(d < 0, d + max_range, d)
    return np.concatenate([[raw[0]], raw[0] + np.cumsum(d)])


class RAPLSampler(PowerSampler):
    """CPU energy from Linux powercap RAPL counters (``energy_uj``, often root-only since Linux 5.10).

    Total: the ``psys`` (platform) zone when present, else the sum of the top-level package zones. The
    figure covers CPU packages (and DRAM where the platform reports it), never the whole machine.

    Args:
        root: the powercap folder (``/sys/class/powercap``; tests pass a fake tree).
        interval_s: counter polling period (fast enough that a counter cannot wrap twice in between).
    """

    source = "rapl"
    kind = "counter"

    def __init__(self, root: str | Path = "/sys/class/powercap", interval_s: float = 0.05,
                 gap_factor: float = DEFAULT_GAP_FACTOR) -> None:
        super().__init__(interval_s, gap_factor)
        self.root = Path(root)
        self._zones = find_rapl_zones(self.root)
        tops = [z for z in self._zones if z["top"]]
        psys = [z for z in tops if z["name"].startswith("psys")]
        if psys:
            self.total, self.total_note = psys[0]["name"], "RAPL platform (psys) energy"
            self._summed = [psys[0]["name"]]
        else:
            pk = [z["name"] for z in tops if z["name"].startswith("package")] or [z["name"] for z in tops]
            self._summed = pk
            self.total = pk[0] if len(pk) == 1 else "sum(" + "+".join(pk) + ")"
            self.total_note = "RAPL CPU package energy: GPU, DRAM and the rest of the machine not included"
        self._last: dict[str, float] = {}
        self._acc: dict[str, float] = {}

    def probe(self) -> str | None:
        if not self.root.is_dir():
            return f"{self.root} does not exist (RAPL not exposed: VM, non-x86 CPU or powercap disabled)"
        present = list(self.root.glob("*/energy_uj"))
        if not present:
            return f"no RAPL zones with energy_uj under {self.root}"
        if not self._zones or not self._summed:
            return f"no top-level RAPL zones under {self.root}"
        try:
            for z in self._zones:
                int(z["path"].read_text())
        except PermissionError:
            return (f"RAPL energy_uj under {self.root} is not readable (root-only since Linux 5.10): "
                    "run as root or grant read access")
        except (OSError, ValueError) as exc:
            return f"RAPL energy_uj unreadable: {exc}"
        return None

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for z in self._zones:
            raw = float(int(z["path"].read_text()))
            last = self._last.get(z["name"])
            acc = self._acc.get(z["name"], 0.0)
            if last is not None:
                delta = raw - last
                if delta < 0:
                    if not z["max_uj"]:
                        raise ValueError(f"RAPL counter {z['path']} went backwards and has no "
                                         "max_energy_range_uj")
                    delta += z["max_uj"]
                acc += delta
            self._last[z["name"]], self._acc[z["name"]] = raw, acc
            out[z["name"]] = acc / 1e6
        if self.total not in out:
            out[self.total] = float(sum(out[n] for n in self._summed))
        return out

    def start(self) -> None:
        self._last, self._acc = {}, {}
        super().start()


# -- choice ------------------------------------------------------------------------------------------------


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

