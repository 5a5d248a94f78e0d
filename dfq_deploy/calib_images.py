"""Saved calibration images (``images.safetensors`` of a ``dfq-deploy synth`` folder), read without torch.

The one reader of such files: ``export --calib-from`` (:func:`dfq_deploy.synth.load_synth_dir`) and ``build``'s
INT8 calibrator (:mod:`dfq_deploy.trt.calibrator`) both go through it. NumPy and safetensors only, so an engine
build does not import torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfq_deploy.errors import DfqError

#: The file of a synth folder that holds the images (key ``images``, float32 ``[N, C, H, W]``, normalised).
CALIB_IMAGES_FILE = "images.safetensors"
CALIB_IMAGES_KEY = "images"


def calib_images_header(path: str | Path, fix: str = "save the calibration images again"
                        ) -> tuple[int, tuple[int, int, int]]:
    """``(N, (C, H, W))`` of a saved ``images.safetensors`` from its header, without loading the pixels.

    Raises:
        DfqError: unreadable file, no ``images`` key, not float32, not ``[N, C, H, W]`` with ``N >= 1``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
            if CALIB_IMAGES_KEY not in keys:
                raise DfqError(f"{path} has no '{CALIB_IMAGES_KEY}' tensor (keys: {keys}): {fix}")
            sl = f.get_slice(CALIB_IMAGES_KEY)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError, ValueError) as exc:
        raise DfqError(f"{path} is corrupt, not a readable safetensors file ({exc}): {fix}") from exc
    if dtype != "F32":
        raise DfqError(f"{path}: '{CALIB_IMAGES_KEY}' is {dtype}, expected float32 (F32) normalised images")
    if len(shape) != 4 or shape[0] < 1:
        raise DfqError(f"{path}: '{CALIB_IMAGES_KEY}' has shape {shape}, expected [N, 3, H, W] with N >= 1")
    return int(shape[0]), (int(shape[1]), int(shape[2]), int(shape[3]))


def read_calib_images(path: str | Path, fix: str = "save the calibration images again"
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (float32 ``[N, C, H, W]``, contiguous) and, if saved, the targets of an ``images.safetensors``.

    Raises:
        DfqError: what :func:`calib_images_header` refuses, an unreadable body, or NaN / Inf pixels.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    calib_images_header(path, fix)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DfqError(f"{path} is corrupt, could not be read ({exc}): {fix}") from exc
    images = np.ascontiguousarray(tensors[CALIB_IMAGES_KEY], dtype=np.float32)
    if not np.all(np.isfinite(images)):
        raise DfqError(f"{path}: calibration images contain NaN or Inf values: {fix}")
    return images, tensors.get("targets")
