"""Shared fixtures: tiny random-weight timm models and small ImageFolders made in tmp_path.

The suite runs in parallel processes (pytest-xdist, ``-n auto`` in pyproject's ``addopts``); each worker gets an
equal share of the cores for its math libraries (and the subprocesses its tests start, through the environment),
set here before torch is imported, so that the workers do not oversubscribe the machine.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = _threads

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dfq_deploy.models import ModelSpec, create_model  # noqa: E402

TINY_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}


@pytest.fixture
def tiny_spec() -> ModelSpec:
    """DeiT-Tiny widths, 32x32 input, patch 4, depth 2, random weights."""
    return ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True)


@pytest.fixture
def tiny_model(tiny_spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(tiny_spec)


def make_image_folder(root: Path, classes: int = 10, per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Write ``classes x per_class`` random RGB PNGs as ``root/<class>/<i>.png``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


_CALIBRATION_KEYS = {"calib": "source", "num_samples": "num_samples", "synth_iters": "iterations",
                     "synth_precision": "precision", "calib_dir": "calib_dir", "calib_from": "calib_from"}
_CORRECTION_KEYS = {"correct": "mode", "shrink": "shrink", "reparam": "reparam", "reconstruct": "reconstruct",
                    "reconstruct_iters": "reconstruct_iters"}


def export_options(**flat):
    """``ExportOptions`` from the CLI's flat names (``calib=``, ``correct=``, ...), as the CLI builds them."""
    from dfq_deploy.config import CalibrationConfig, CorrectionConfig
    from dfq_deploy.pipeline import ExportOptions

    cal = {_CALIBRATION_KEYS[k]: flat.pop(k) for k in list(flat) if k in _CALIBRATION_KEYS}
    cor = {_CORRECTION_KEYS[k]: flat.pop(k) for k in list(flat) if k in _CORRECTION_KEYS}
    for key in ("calib_dir", "calib_from"):
        if cal.get(key) is not None:
            cal[key] = str(cal[key])
    return ExportOptions(calibration=CalibrationConfig(**cal), correction=CorrectionConfig(**cor), **flat)
