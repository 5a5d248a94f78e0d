"""--device: resolving it, the numerics each stage runs with, and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from dfq_deploy.device import (
    autocast_dtype,
    describe_device,
    exact_float32,
    model_device,
    resolve_device,
    synthesis_numerics,
)
from dfq_deploy.errors import DfqError

HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_torch_sees_a_gpu_else_the_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["mps", "gpu", "cuda:x", "cuda:-1", "tpu"])
def test_unknown_device_names_the_choices(spec: str) -> None:
    with pytest.raises(DfqError, match=r"use one of auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is available here")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_line_naming_the_fix(spec: str) -> None:
    with pytest.raises(DfqError) as err:
        resolve_device(spec)
    msg = str(err.value)
    assert msg.startswith(f"--device {spec}: CUDA is not available here") and "--device cpu" in msg
    assert "\n" not in msg


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_index_beyond_the_gpus_is_refused() -> None:
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DfqError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


def test_model_device_and_description(tiny_model: torch.nn.Module) -> None:
    assert model_device(tiny_model) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")
    assert describe_device(torch.device("cpu"))["device"] == "cpu"


def test_numerics_contexts_set_and_restore_tf32() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with synthesis_numerics(torch.device("cpu"), "fp32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.is_autocast_enabled("cpu")
        with exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bf16_synthesis_autocasts_matmuls_on_the_cpu() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with synthesis_numerics(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") == torch.bfloat16
    with pytest.raises(DfqError, match="use one of fp32, bf16"):
        autocast_dtype("fp8")
