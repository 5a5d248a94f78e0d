"""Calibration batching, caches and saved images (CPU); the TensorRT calibrator needs TensorRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.trt.build import build_engine
from dfq_deploy.trt.calibrator import (
    CalibrationBatcher,
    load_calib_images,
    make_int8_calibrator,
    read_cache,
    write_cache,
)
from dfq_deploy.trt.planner import (
    plan_build,
)
from tests.trt.graphs import CHW, HAS_TRT, save_calib, save_model


def test_calibration_batcher_drops_the_partial_batch() -> None:
    images = np.arange(10 * 48, dtype=np.float64).reshape(10, *CHW)
    b = CalibrationBatcher(images, 4)
    assert (len(b), b.dropped, b.count) == (2, 2, 0)
    assert b.shape == (4, *CHW)
    assert b.nbytes == 4 * 48 * 4
    first = b.next_batch()
    assert first is not None
    assert first.dtype == np.float32 and first.flags["C_CONTIGUOUS"] and first.shape == (4, *CHW)
    np.testing.assert_array_equal(first, images[:4].astype(np.float32))
    second = b.next_batch()
    assert second is not None
    np.testing.assert_array_equal(second, images[4:8].astype(np.float32))
    assert b.next_batch() is None
    assert b.count == 2
    b.reset()
    assert b.count == 0
    again = b.next_batch()
    assert again is not None
    np.testing.assert_array_equal(again, first)
    assert [x[0, 0, 0, 0] for x in b] == [0.0, 4 * 48.0]  # iterating restarts from the first batch


def test_calibration_batcher_errors() -> None:
    with pytest.raises(DfqError, match="fewer than one batch"):
        CalibrationBatcher(np.zeros((3, *CHW), np.float32), 4)
    with pytest.raises(DfqError, match=r"\[N, C, H, W\]"):
        CalibrationBatcher(np.zeros((3, 4, 4), np.float32), 1)
    with pytest.raises(DfqError, match=">= 1"):
        CalibrationBatcher(np.zeros((3, *CHW), np.float32), 0)


def test_cache_read_write(tmp_path: Path) -> None:
    assert read_cache(None) is None
    path = tmp_path / "sub" / "calib.cache"
    assert read_cache(path) is None
    write_cache(path, b"TRT-1234-EntropyCalibration2\n")
    assert read_cache(path) == b"TRT-1234-EntropyCalibration2\n"
    write_cache(path, memoryview(b"second"))
    assert read_cache(path) == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["calib.cache"]  # no temp files left
    path.write_bytes(b"")
    assert read_cache(path) is None


def test_load_calib_images(tmp_path: Path) -> None:
    d = save_calib(tmp_path, n=6)
    arr = load_calib_images(d, input_shape=(1, *CHW))
    assert arr.shape == (6, *CHW) and arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"]
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(arr, load_file(str(d / "images.safetensors"))["images"])
    with pytest.raises(DfqError, match=r"images are \[3, 4, 4\].*needs \[3, 8, 8\]"):
        load_calib_images(d, input_shape=(3, 8, 8))


def test_load_calib_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="folder not found"):
        load_calib_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfqError, match="no images.safetensors"):
        load_calib_images(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "images.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DfqError, match="not a readable safetensors"):
        load_calib_images(corrupt)
    with pytest.raises(DfqError, match="no 'images' tensor"):
        load_calib_images(save_calib(tmp_path, key="x", name="wrongkey"))
    with pytest.raises(DfqError, match="float32"):
        load_calib_images(save_calib(tmp_path, dtype=np.float64, name="f64"))
    with pytest.raises(DfqError, match=r"expected \[N, 3, H, W\]"):
        load_calib_images(save_calib(tmp_path, chw=(4, 4), name="rank3"))
    from safetensors.numpy import save_file

    nan = tmp_path / "nan"
    nan.mkdir()
    save_file({"images": np.full((2, *CHW), np.nan, np.float32)}, str(nan / "images.safetensors"))
    with pytest.raises(DfqError, match="NaN"):
        load_calib_images(nan)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_trt_entry_points_need_tensorrt(tmp_path: Path) -> None:

    batcher = CalibrationBatcher(np.zeros((4, *CHW), np.float32), 2)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        make_int8_calibrator(batcher, tmp_path / "c.cache")
    plan = plan_build(save_model(tmp_path, "int8"), "int8")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        build_engine(plan)
    assert not Path(plan.output).exists()

