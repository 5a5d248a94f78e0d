"""Energy of a benchmark window from time-stamped readings: power integrated, or a counter differenced.

Integration (:func:`integrate_power`): trapezoidal over the ``(t, watts)`` samples inside the window, with the
power at the window edges linearly interpolated from the neighbouring samples. The part of a window that no
pair of samples brackets is not extrapolated: it is reported as missing ``coverage``. Consecutive samples further
apart than ``gap_factor`` (default 3) times the sampling interval are reported in ``gaps``. Counter sources (NVML,
RAPL) use :func:`energy_from_counter`: the difference of the counter, interpolated at the edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


#: Consecutive samples further apart than this many sampling intervals are reported as a gap.
DEFAULT_GAP_FACTOR = 3.0


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
