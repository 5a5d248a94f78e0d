"""Progress of a long stage: a tqdm bar on a terminal, log lines with an ETA everywhere else.

Every stage that can take more than a few seconds (ranges, corrections, parity, evaluation) reports through
:class:`Progress`. With ``bar=True`` and stderr a terminal it draws a tqdm bar; otherwise (a log file, a CI job,
the Python API) it logs ``desc: k/n unit, elapsed, ETA`` lines on the stage's logger, at most one every
``every_s`` seconds, and always the first and the last, so a long stage is never silent where logging is on.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """Count ``total`` steps of one stage (a context manager).

    Args:
        total: steps the stage takes.
        desc: what the stage does (``"ranges"``, ``"parity held_back"``).
        unit: what a step is (``"block"``, ``"img"``).
        log: the logger the lines go to (the stage's module logger).
        bar: draw a tqdm bar when stderr is a terminal (the CLI's ``progress``); lines otherwise.
        every_s: least seconds between two log lines (0: a line a step).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", log: logging.Logger | None = None,
                 bar: bool = False, every_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.log = log or logger
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar: Any = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def line(self) -> str:
        """``desc: k/n unit (p%), elapsed, ETA`` as logged."""
        elapsed = time.perf_counter() - self.t0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), " \
               f"{_fmt_s(elapsed)}"
        if 0 < self.done < self.total:
            text += f", ETA {_fmt_s(elapsed / self.done * (self.total - self.done))}"
        return text

    def update(self, n: int = 1) -> None:
        first = self.done == 0
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if first or self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.log.debug(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
