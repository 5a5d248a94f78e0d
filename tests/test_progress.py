"""Long stages are never silent: log lines with an ETA off a terminal (and from the Python API)."""

from __future__ import annotations

import logging

import torch

from dfq_deploy.progress import Progress


def test_lines_with_eta_first_last_and_throttled(caplog):
    log = logging.getLogger("dfq_deploy.test_progress")
    caplog.set_level(logging.INFO, logger=log.name)
    with Progress(5, "stage", "blocks", log, every_s=3600) as prog:
        for _ in range(5):
            prog.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the first and the last; the rest inside the interval are dropped
    assert lines[0].startswith("stage: 1/5 blocks (20%)") and "ETA" in lines[0]
    assert lines[1].startswith("stage: 5/5 blocks (100%)") and "ETA" not in lines[1]
    caplog.clear()
    with Progress(3, "each", log=log, every_s=0) as prog:
        for _ in range(3):
            prog.update()
    assert [r.getMessage().split(":")[1].split()[0] for r in caplog.records] == ["1/3", "2/3", "3/3"]


def test_quantize_reports_its_stages_through_logging(tiny_model, caplog):
    from dfq_deploy import W8A8, quantize_

    caplog.set_level(logging.INFO, logger="dfq_deploy")
    quantize_(tiny_model, W8A8, torch.randn(4, 3, 32, 32))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("ranges: W8A8 from 4 calibration images") for line in lines)
    blocks = [line for line in lines if line.startswith("correct (diag): ")]
    assert blocks[0].startswith("correct (diag): 1/2 blocks") and "ETA" in blocks[0]
    assert blocks[-1].startswith("correct (diag): 2/2 blocks (100%)")
