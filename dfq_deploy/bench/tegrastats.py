"""``tegrastats`` as an energy source: a process started for the window, or a log the user recorded, parsed.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.bench.energy import DEFAULT_GAP_FACTOR, integrate_power
from dfq_deploy.bench.rails import choose_total_rail, is_nc, rail_note
from dfq_deploy.bench.sampler import PowerSampler, unavailable
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


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
        if is_nc(name):
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
