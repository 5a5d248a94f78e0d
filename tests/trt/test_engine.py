"""TRTEngine and its timings: profile checks and summaries (CPU), engines (GPU), the example app."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.trt.build import build_engine
from dfq_deploy.trt.engine import TRTEngine
from dfq_deploy.trt.planner import (
    plan_build,
)
from dfq_deploy.trt.timing import InferTiming, check_input_shape, summarize_timings
from tests.conftest import make_image_folder
from tests.trt.graphs import CHW, HAS_TRT, NUM_CLASSES, requires_gpu, save_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "classify_folder.py"


# --- profile checks ---------------------------------------------------------------------------------------
def test_check_input_shape_inside_profile() -> None:
    for batch in (1, 5, 32):
        check_input_shape("input", (batch, 3, 4, 4), (1, 3, 4, 4), (32, 3, 4, 4))


def test_check_input_shape_errors() -> None:
    with pytest.raises(DfqError, match=r"batch 33, outside the engine's profile 1\.\.32.*--batch"):
        check_input_shape("input", (33, 3, 4, 4), (1, 3, 4, 4), (32, 3, 4, 4))
    with pytest.raises(DfqError, match="batch 1, outside"):
        check_input_shape("input", (1, 3, 4, 4), (2, 3, 4, 4), (8, 3, 4, 4))
    with pytest.raises(DfqError, match=r"expects \[N, 3, 4, 4\]"):
        check_input_shape("input", (2, 3, 8, 8), (1, 3, 4, 4), (32, 3, 4, 4))
    with pytest.raises(DfqError, match="rank 4"):
        check_input_shape("input", (2, 48), (1, 3, 4, 4), (32, 3, 4, 4))


# --- timing summaries -------------------------------------------------------------------------------------
def test_summarize_timings() -> None:
    rows = [InferTiming(8, 0.5, 2.0, 0.1, 3.0), InferTiming(8, 0.5, 4.0, 0.1, 5.0),
            InferTiming(8, 0.5, 6.0, 0.1, 7.0), InferTiming(8, 0.5, 100.0, 0.1, 101.0)]
    s = summarize_timings(rows, skip=1)  # the first call is warm-up
    assert (s["calls"], s["images"]) == (3, 24)
    assert s["compute_ms"]["mean"] == pytest.approx((4 + 6 + 100) / 3)
    assert s["compute_ms"]["median"] == pytest.approx(6.0)
    assert s["h2d_ms"]["p90"] == pytest.approx(0.5)
    assert s["gpu_ms"]["median"] == pytest.approx(6.6)
    assert s["images_per_s_compute"] == pytest.approx(1000 * 24 / 110)
    assert s["images_per_s_wall"] == pytest.approx(1000 * 24 / 113)
    assert rows[0].gpu_ms == pytest.approx(2.6)
    with pytest.raises(DfqError, match="no timed calls"):
        summarize_timings(rows, skip=4)


# --- TRTEngine without TensorRT / GPU ---------------------------------------------------------------------
def test_trt_engine_missing_file(tmp_path: Path) -> None:
    eng = TRTEngine(tmp_path / "missing.engine")
    assert not eng.is_open and eng.timings == {} and list(eng.timing_history) == []
    with pytest.raises(DfqError, match="engine file not found"), eng:
        pass
    with pytest.raises(DfqError, match="engine file not found"):
        eng.infer(np.zeros((1, *CHW), np.float32))
    eng.close()  # closing an engine that never opened is harmless


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_trt_engine_without_tensorrt(tmp_path: Path) -> None:
    path = tmp_path / "model.engine"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        TRTEngine(path).open()
    eng = TRTEngine(path)
    with pytest.raises(MissingDependencyError):
        _ = eng.input_shape
    assert not eng.is_open


def test_trt_engine_build_info_reads_the_engine_json(tmp_path: Path) -> None:
    path = tmp_path / "model.engine"
    assert TRTEngine(path).build_info == {}
    (tmp_path / "model.engine.json").write_text(json.dumps({"precision": "int8", "gpu": "Orin"}))
    eng = TRTEngine(path)
    assert (eng.precision, eng.device_name) == ("int8", "Orin")
    assert not eng.is_open  # reading the build description does not open the engine


# --- the example app's preprocessing config ---------------------------------------------------------------
def _load_example():
    spec = importlib.util.spec_from_file_location("classify_folder", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_data_config_from_report_and_flags(tmp_path: Path, capsys) -> None:
    ex = _load_example()
    engine = tmp_path / "model.engine"
    report = {"data_config": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                              "crop_pct": 1.0, "interpolation": "bicubic"}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    args = ex.argparse.Namespace(report=None, size=None, mean=None, std=None, crop_pct=None, interpolation=None)
    cfg = ex.data_config(engine, args)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["crop_pct"] == 1.0
    args.size, args.mean = "24x16", "0.1,0.2,0.3"
    cfg = ex.data_config(engine, args)
    assert cfg["input_size"] == (3, 24, 16) and cfg["mean"] == (0.1, 0.2, 0.3)
    alone = ex.argparse.Namespace(report=None, size="8", mean="0,0,0", std="1,1,1", crop_pct=None,
                                  interpolation=None)
    cfg = ex.data_config(tmp_path / "elsewhere" / "m.engine", alone)
    assert cfg["input_size"] == (3, 8, 8) and cfg["crop_pct"] == ex.DEFAULT_CROP_PCT
    alone.std = None
    with pytest.raises(DfqError, match=r"\['std'\]"):
        ex.data_config(tmp_path / "elsewhere" / "m.engine", alone)
    alone.std = "1,1"
    with pytest.raises(DfqError, match="3 comma-separated"):
        ex.data_config(tmp_path / "elsewhere" / "m.engine", alone)
    rc = ex.main([str(tmp_path / "missing.engine"), str(tmp_path), "--size", "8", "--mean", "0,0,0",
                  "--std", "1,1,1"])
    assert rc == 2  # one-line error, exit code 2
    assert "engine file not found" in capsys.readouterr().err
    rc = ex.main([str(tmp_path / "missing.engine"), str(tmp_path), "--size", "8", "--mean", "0,0,0",
                  "--std", "1,1,1", "--threads", "0"])
    assert rc == 2 and "--threads 0" in capsys.readouterr().err


# --- GPU ---------------------------------------------------------------------------------------------------
@pytest.fixture
def engine_path(tmp_path: Path) -> Path:

    return build_engine(plan_build(save_model(tmp_path, "int8", chw=(3, 8, 8)), "int8", batch="1,4,8",
                                   workspace_mb=256))


@pytest.mark.gpu
@requires_gpu
def test_trt_engine_open_close_and_dynamic_batch(engine_path: Path) -> None:
    eng = TRTEngine(engine_path)
    assert eng.input_shape == (-1, 3, 8, 8)  # opens on first use
    assert eng.is_open and eng.batch_range == (1, 4, 8) and eng.precision == "int8"
    assert [eng.profile_for(b) for b in (1, 8, 3)] == [0, 2, 3]  # exact profiles 1 and 8, the 1..8 range for 3
    outs = [eng.infer(np.ones((b, 3, 8, 8), np.float32)) for b in (1, 8, 3)]
    assert [o.shape for o in outs] == [(1, NUM_CLASSES), (8, NUM_CLASSES), (3, NUM_CLASSES)]
    np.testing.assert_allclose(outs[1][:3], outs[2], rtol=1e-3, atol=1e-3)  # two profiles, maybe two kernels
    with pytest.raises(DfqError, match="float64"):
        eng.infer(np.ones((2, 3, 8, 8)))
    eng.close()
    assert not eng.is_open
    eng.close()


@pytest.mark.gpu
@requires_gpu
def test_trt_engine_takes_torch_cuda_tensors_without_copies(engine_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x = torch.randn(4, 3, 8, 8, device="cuda")
    with TRTEngine(engine_path) as eng:
        host = eng.infer(x.cpu().numpy())
        dev = eng.infer(x)
        assert eng.timings["h2d_ms"] == 0.0 or eng.timings["h2d_ms"] < 0.05  # nothing copied
    assert isinstance(dev, torch.Tensor) and dev.is_cuda
    np.testing.assert_allclose(dev.cpu().numpy(), host, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_gpu
def test_one_engine_serves_many_threads_each_with_its_own_context(engine_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(int(b), 3, 8, 8)).astype(np.float32) for b in rng.integers(1, 9, size=24)]
    with TRTEngine(engine_path) as eng:
        alone = [eng.infer(x) for x in batches]
    with TRTEngine(engine_path) as eng, ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(eng.infer, batches))
        assert 1 <= eng.num_contexts <= 4 and len(eng.timing_history) == len(batches)
    for a, b in zip(alone, shared, strict=True):
        np.testing.assert_array_equal(a, b)  # same engine, same inputs: bit-identical from any thread
    with TRTEngine(engine_path, max_contexts=1) as eng, ThreadPoolExecutor(4) as pool:
        capped = list(pool.map(eng.infer, batches))
        assert eng.num_contexts == 1
    for a, b in zip(alone, capped, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@requires_gpu
def test_cuda_graphs_replay_repeated_shapes_with_the_same_outputs(engine_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32)
    with TRTEngine(engine_path) as eng:
        plain = [eng.infer(x[:b]) for b in (4, 4, 4, 2, 2, 4)]
    with TRTEngine(engine_path, cuda_graphs=True) as eng:
        graphed = [eng.infer(x[:b]) for b in (4, 4, 4, 2, 2, 4)]
        # batch 4 runs on profile 1 and batch 2 on the range profile 3, each in a context of its own: calls 2-3
        # and 6 (batch 4, its graph kept) and 5 (batch 2) replay; the first call of a shape runs plainly
        assert eng.graph_calls == 4 and eng.profile_switches == 0, (eng.graph_calls, eng.profile_switches)
        assert eng.timings["compute_ms"] > 0
    for a, b in zip(plain, graphed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_graph_captures_in_threads_beside_default_stream_work(engine_path: Path) -> None:
    """Captures on the engine's non-blocking streams leave other threads' default-stream work legal."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype(np.float32)
    stop = threading.Event()
    errors: list[BaseException] = []

    def default_stream_work() -> None:
        a = torch.randn(256, 256, device="cuda")
        try:
            while not stop.is_set():
                (a @ a).sum().item()  # legacy default stream, synchronising copy
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    side = threading.Thread(target=default_stream_work)
    side.start()
    try:
        with TRTEngine(engine_path) as eng:
            ref = eng.infer(x)
        with TRTEngine(engine_path, cuda_graphs=True) as eng, ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(eng.infer, [x] * 30))
            assert eng.graph_calls > 0
    finally:
        stop.set()
        side.join()
    assert not errors, errors
    for out in outs:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_each_batch_runs_on_its_profile_and_a_switched_context_agrees(engine_path: Path) -> None:
    meta = json.loads((engine_path.parent / (engine_path.name + ".json")).read_text())
    assert [(p["index"], p["min"][0], p["opt"][0], p["max"][0]) for p in meta["profiles"]] == [
        (0, 1, 1, 1), (1, 4, 4, 4), (2, 8, 8, 8), (3, 1, 4, 8)]
    x = np.random.default_rng(4).normal(size=(8, 3, 8, 8)).astype(np.float32)
    batches = (1, 4, 8, 3)
    with TRTEngine(engine_path) as eng:
        assert eng.profiles == [(1, 1, 1), (4, 4, 4), (8, 8, 8), (1, 4, 8)]  # read back from the engine
        own = [eng.infer(x[:b]) for b in batches]
        assert eng.num_contexts == 4 and eng.profile_switches == 0  # one context per profile, none switched
    with TRTEngine(engine_path, max_contexts=1) as eng:
        for _ in range(2):
            for b, ref in zip(batches, own, strict=True):
                np.testing.assert_allclose(eng.infer(x[:b]), ref, rtol=1e-6, atol=1e-6)
        # one context, switched by set_optimization_profile_async at every call but the first
        assert eng.num_contexts == 1 and eng.profile_switches == 7, eng.profile_switches
    with pytest.raises(DfqError, match=r"batch 9 is outside the engine's profiles"), TRTEngine(engine_path) as eng:
        eng.infer(np.zeros((9, 3, 8, 8), np.float32))


@pytest.mark.gpu
@requires_gpu
def test_exclusive_profiles_serve_one_call_per_profile(engine_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    x = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)
    with TRTEngine(engine_path) as eng:
        ref = eng.infer(x)
    with TRTEngine(engine_path, share_profiles=False) as eng, ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(eng.infer, [x] * 12))
        assert eng.num_contexts <= 2  # the one made at open (profile 0) and one on profile 1
    for out in outs:
        np.testing.assert_array_equal(out, ref)


@pytest.mark.gpu
@requires_gpu
def test_a_closed_engine_refuses_calls(engine_path: Path) -> None:
    eng = TRTEngine(engine_path)
    eng.infer(np.ones((1, 3, 8, 8), np.float32))
    eng.close()
    with pytest.raises(DfqError, match="was closed"):
        eng.infer(np.ones((1, 3, 8, 8), np.float32))
    eng.open()  # an explicit open brings it back
    assert eng.infer(np.ones((1, 3, 8, 8), np.float32)).shape == (1, NUM_CLASSES)
    eng.close()


@pytest.mark.gpu
@requires_gpu
def test_engine_from_another_tensorrt_or_gpu_is_refused_in_one_line(engine_path: Path) -> None:
    meta_path = engine_path.parent / (engine_path.name + ".json")
    meta = json.loads(meta_path.read_text())
    meta["tensorrt_version"] = "9.0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DfqError, match=r"built by TensorRT 9\.0\.0\.1 but this is TensorRT"):
        TRTEngine(engine_path).open()
    with TRTEngine(engine_path, check_build=False):  # the record alone was wrong: the engine itself runs
        pass


@pytest.mark.gpu
@requires_gpu
def test_example_classifies_a_folder(engine_path: Path, tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=8)
    ex = _load_example()
    rc = ex.main([str(engine_path), str(data), "--size", "8", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                  "--crop-pct", "1.0", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "top-1" in out and "on 6 images" in out and "images/s" in out
    one_thread = out.splitlines()[0]
    rc = ex.main([str(engine_path), str(data), "--size", "8", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                  "--crop-pct", "1.0", "--batch-size", "2", "--threads", "2", "--cuda-graphs"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].split(" on ")[0] == one_thread.split(" on ")[0]  # same top-1
    assert "2 thread(s)" in out
