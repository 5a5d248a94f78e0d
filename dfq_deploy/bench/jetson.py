"""The Jetson on-module INA3221 power monitors in sysfs as an energy source.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from dfq_deploy.bench.energy import DEFAULT_GAP_FACTOR
from dfq_deploy.bench.rails import choose_total_rail, is_nc, read_text
from dfq_deploy.bench.sampler import PowerSampler

logger = logging.getLogger(__name__)


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
        names = [read_text(hw / "name"), read_text(hw.parent.parent / "name")]
        if not any(n and "ina3221" in n.lower() for n in names):
            continue
        update = read_text(hw / "update_interval")
        for label_file in sorted(hw.glob("in*_label"), key=lambda p: p.name):
            m = re.fullmatch(r"in(\d+)_label", label_file.name)
            if not m:
                continue
            n = int(m.group(1))
            label = read_text(label_file) or ""
            if not label or is_nc(label):
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
