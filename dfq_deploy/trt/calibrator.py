"""Implicit-INT8 calibration from saved synthetic images (TensorRT 10.x; TensorRT 11 has no calibrators).

:class:`CalibrationBatcher`, :func:`read_cache`, :func:`write_cache` and :func:`load_calib_images` are plain
NumPy; :func:`make_int8_calibrator` wraps them in a ``tensorrt.IInt8EntropyCalibrator2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.calib_images import CALIB_IMAGES_FILE, CALIB_IMAGES_KEY, calib_images_header, read_calib_images
from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

#: File inside ``--calib-from DIR`` holding the saved synthetic calibration images.


# --- calibration (plain Python) ---------------------------------------------------------------------------
class CalibrationBatcher:
    """Cuts ``[N, C, H, W]`` calibration images into batches of exactly ``batch_size``.

    The last partial batch is dropped (not padded): padding would put made-up pixels into TensorRT's
    activation histograms. ``N // batch_size`` batches are served, ``N % batch_size`` images are unused.

    Args:
        images: float array ``[N, C, H, W]`` (converted once to contiguous float32).
        batch_size: images per batch.

    Raises:
        DfqError: wrong rank, no images, or fewer images than one batch.
    """

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise DfqError(f"calibration images must be [N, C, H, W], got shape {list(arr.shape)}")
        if batch_size < 1:
            raise DfqError(f"calibration batch size {batch_size} must be >= 1")
        if len(arr) < batch_size:
            raise DfqError(f"{len(arr)} calibration images are fewer than one batch of {batch_size}: lower "
                           "the calibration batch size or save more images")
        self.images = np.ascontiguousarray(arr, dtype=np.float32)
        self.batch_size = int(batch_size)
        self.num_batches = len(self.images) // self.batch_size
        self.dropped = len(self.images) - self.num_batches * self.batch_size
        self.count = 0
        if self.dropped:
            logger.info("calibration: %d batches of %d, last %d image(s) unused", self.num_batches,
                        self.batch_size, self.dropped)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of every batch."""
        return (self.batch_size, *self.images.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of one batch (size of the device buffer it is copied to)."""
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return self.num_batches

    def next_batch(self) -> np.ndarray | None:
        """The next batch (contiguous float32, exactly ``batch_size`` images) or None when exhausted."""
        if self.count >= self.num_batches:
            return None
        start = self.count * self.batch_size
        self.count += 1
        return self.images[start : start + self.batch_size]

    def reset(self) -> None:
        """Start again from the first batch."""
        self.count = 0

    def __iter__(self):
        self.reset()
        while (batch := self.next_batch()) is not None:
            yield batch


def read_cache(path: str | Path | None) -> bytes | None:
    """Contents of a cache file (calibration or timing cache), or None if unset, missing or empty."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    data = p.read_bytes()
    return data or None


def write_cache(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write a cache file atomically (temp file in the same folder, then rename)."""
    return atomic_write_bytes(path, bytes(data))


def inspect_calib_images(calib_dir: str | Path) -> tuple[int, tuple[int, int, int]]:
    """``(N, (C, H, W))`` of ``DIR/images.safetensors`` from its header, without loading the pixels.

    Raises:
        DfqError: folder or file missing, corrupt file, no ``images`` key, wrong dtype or rank.
    """
    return calib_images_header(_calib_file(calib_dir))


def _calib_file(calib_dir: str | Path) -> Path:
    d = Path(calib_dir)
    if not d.is_dir():
        raise DfqError(f"--calib-from {d}: folder not found (it must hold {CALIB_IMAGES_FILE})")
    path = d / CALIB_IMAGES_FILE
    if not path.is_file():
        raise DfqError(f"--calib-from {d}: no {CALIB_IMAGES_FILE} in it (saved synthetic calibration images, "
                       f"key '{CALIB_IMAGES_KEY}', float32 [N, 3, H, W])")
    return path


def check_calib_shape(chw: Sequence[int], expected: Sequence[int] | None, path: Path) -> None:
    if expected is not None and tuple(chw) != tuple(expected):
        raise DfqError(f"{path}: images are {list(chw)} (C, H, W) but the ONNX input needs {list(expected)}: "
                       "save calibration images at the model's input size")


def load_calib_images(calib_dir: str | Path, input_shape: Sequence[int] | None = None) -> np.ndarray:
    """Load saved synthetic calibration images from ``DIR/images.safetensors``.

    Args:
        calib_dir: folder holding ``images.safetensors`` with key ``images``: float32 ``[N, 3, H, W]``,
            already normalised with the model's mean/std.
        input_shape: the ONNX input's ``(C, H, W)`` (or a full ``(N, C, H, W)``; the batch is ignored).

    Returns:
        Contiguous float32 ``[N, C, H, W]``.

    Raises:
        DfqError: missing folder/file, corrupt file, missing key, wrong dtype/shape, non-finite values.
    """
    n, chw = inspect_calib_images(calib_dir)
    path = _calib_file(calib_dir)
    if input_shape is not None:
        check_calib_shape(chw, tuple(input_shape)[-3:], path)
    images, _ = read_calib_images(path)
    logger.info("loaded %d calibration images %s from %s", n, list(chw), path)
    return images


def make_int8_calibrator(
    batcher: CalibrationBatcher, cache_path: str | Path, backend: str | None = None
) -> Any:
    """A ``tensorrt.IInt8EntropyCalibrator2`` that feeds ``batcher``'s batches and uses ``cache_path``.

    The returned object has ``free()`` (release its device buffer) and ``error`` (an exception raised inside a
    TensorRT callback, re-raised by :func:`build_engine` after the build).

    Args:
        batcher: calibration batches.
        cache_path: calibration cache; read if present (TensorRT then skips calibration), written after.
        backend: CUDA allocator, ``"cuda-python"`` (default) or ``"pycuda"``.

    Raises:
        MissingDependencyError: TensorRT or the CUDA Python bindings are missing.
        DfqError: this TensorRT has no implicit calibration (TensorRT >= 11): use the QDQ route.
    """
    from dfq_deploy.trt.cuda import cuda_backend
    from dfq_deploy.trt.env import require_tensorrt
    from dfq_deploy.trt.plan import qdq_route_message

    trt = require_tensorrt()
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise DfqError(qdq_route_message(str(getattr(trt, "__version__", "?"))))
    cuda = cuda_backend(backend)
    cache = Path(cache_path)

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        """Implicit-INT8 entropy calibrator over a :class:`CalibrationBatcher`."""

        def __init__(self) -> None:
            base.__init__(self)  # TensorRT requires the explicit base-class constructor call
            self.batcher = batcher
            self.cache_file = cache
            self.error: BaseException | None = None
            self._device = cuda.malloc(batcher.nbytes)

        def get_batch_size(self) -> int:
            return batcher.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = batcher.next_batch()
                if batch is None:
                    logger.info("calibration: %d batches done", batcher.num_batches)
                    return None
                cuda.copy_htod(self._device, batch)
                logger.debug("calibration batch %d/%d for %s", batcher.count, batcher.num_batches, names)
                return [int(self._device)]
            except Exception as exc:  # TensorRT callbacks must not raise: re-raised after the build
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            data = read_cache(self.cache_file)
            if data:
                logger.info("using calibration cache %s (delete it to recalibrate)", self.cache_file)
            return data

        def write_calibration_cache(self, data: Any) -> None:
            try:
                write_cache(self.cache_file, memoryview(data).tobytes())
                logger.info("wrote calibration cache %s", self.cache_file)
            except Exception as exc:
                self.error = exc

        def free(self) -> None:
            if self._device is not None:
                cuda.free(self._device)
                self._device = None
                cuda.close()

    return EntropyCalibrator()

