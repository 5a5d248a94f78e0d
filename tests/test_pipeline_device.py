"""The export job's --device and --synth-dtype: fail fast here, CPU/GPU agreement where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq_deploy.cli import main
from dfq_deploy.errors import DfqError
from dfq_deploy.export.ort import ort_session
from dfq_deploy.models import ModelSpec
from dfq_deploy.pipeline import ExportOptions, check_inputs, export_model
from tests.conftest import TINY_KWARGS, export_options

HAS_CUDA = torch.cuda.is_available()
TINY = ["--model", "deit_t", "--model-kwargs", ",".join(f"{k}={v}" for k, v in TINY_KWARGS.items())]


def _opts(out, **kw) -> ExportOptions:
    spec = ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True)
    base = dict(model=spec, bits=8, output=out, calib="dfqvit", synth_iters=3, num_samples=8, progress=False)
    return export_options(**{**base, **kw})


def test_bad_synthesis_precision_is_refused() -> None:
    with pytest.raises(DfqError, match="--synth-dtype fp8 is unknown: use one of fp32, bf16"):
        export_options(synth_precision="fp8")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is available here")
def test_cuda_without_a_gpu_fails_before_any_work(tmp_path, capsys) -> None:
    with pytest.raises(DfqError, match="--device cuda: CUDA is not available here"):
        check_inputs(_opts(tmp_path / "out", device="cuda"))
    assert main(["export", *TINY, "--random-weights", "--device", "cuda", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    assert main(["synth", *TINY, "--random-weights", "--device", "cuda:1", "--output", str(tmp_path / "s")]) == 2


def test_cpu_export_records_the_device_and_bf16_synthesis(tmp_path) -> None:
    report = export_model(_opts(tmp_path / "out", device="cpu", synth_precision="bf16"))
    assert report["device"]["device"] == "cpu" and report["parity"]["passed"]
    assert report["calibration"]["options"]["precision"] == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_export_agrees_with_the_cpu_export(tmp_path) -> None:
    """Synthesis, ranges, corrections and the PyTorch side of parity on CUDA give an artifact like the CPU's."""
    cpu = export_model(_opts(tmp_path / "cpu", device="cpu"))
    gpu = export_model(_opts(tmp_path / "gpu", device="cuda"))
    assert gpu["device"]["device"].startswith("cuda") and gpu["parity"]["passed"]
    x = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    a = ort_session(cpu["artifact"]).run(None, {"input": x})[0]
    b = ort_session(gpu["artifact"]).run(None, {"input": x})[0]
    scale = float(np.median(a.std(-1)))
    # different synthesis kernels give slightly different images, so ranges differ by a few quantisation steps
    assert np.abs(a - b).max() / scale < 0.25
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.75
