"""Intel/AMD RAPL package energy (``/sys/class/powercap/*/energy_uj``), counter wrap handled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.bench.energy import DEFAULT_GAP_FACTOR
from dfq_deploy.bench.rails import read_text
from dfq_deploy.bench.sampler import PowerSampler

logger = logging.getLogger(__name__)


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
        name = read_text(d / "name") or d.name
        top = len(parts) == 2
        if not top:
            parent = read_text(root / ":".join(parts[:2]) / "name")
            name = f"{parent or ':'.join(parts[:2])}/{name}"
        mx = read_text(d / "max_energy_range_uj")
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
