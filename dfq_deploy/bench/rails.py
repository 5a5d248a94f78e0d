"""Jetson power rails: which one is the total and what each powers; small sysfs helpers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


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


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def is_nc(label: str) -> bool:
    return re.fullmatch(r"NC(\b.*)?", label.strip(), flags=re.IGNORECASE) is not None
