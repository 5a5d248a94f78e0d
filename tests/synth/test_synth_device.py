"""Synthesis on a device and in bf16: checkpoints portable across devices, exact chunks, CPU/GPU agreement."""

from __future__ import annotations

import pytest
import torch

from dfq_deploy.errors import DfqError
from dfq_deploy.models import ModelSpec, create_model, data_config
from dfq_deploy.synth import METHODS, synthesize
from dfq_deploy.synth.checkpoint import load_checkpoint, save_checkpoint
from tests.synth.test_synth import TINY, sharpen_, small

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

#: CPU vs CUDA after a few iterations: different kernels, reduction orders and Adam's sign-sensitive steps on
#: near-zero gradients; the images live in [-2.2, 2.7] (normalised), so this is 1% of their range.
DEVICE_ATOL = 5e-2


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return sharpen_(create_model(ModelSpec("deit_t", kwargs=dict(TINY), random_weights=True)))


@pytest.mark.parametrize("method", METHODS.names())
def test_chunks_are_exact_for_every_method(model, method: str) -> None:
    cfg = data_config(model)
    whole = synthesize(model, cfg, method, small(iterations=3, num_samples=6), progress=False)
    parts = synthesize(model, cfg, method, small(iterations=3, num_samples=6, batch_size=4), progress=False)
    for h1, h2 in zip(whole.history, parts.history, strict=True):
        assert h1["total"] == pytest.approx(h2["total"], rel=1e-4)
    assert torch.allclose(whole.images, parts.images, atol=1e-3)


def test_explicit_cpu_equals_the_models_device_and_results_are_cpu_tensors(model) -> None:
    cfg = data_config(model)
    a = synthesize(model, cfg, "dfqvit", small(iterations=3), progress=False)
    b = synthesize(model, cfg, "dfqvit", small(iterations=3), progress=False, device="cpu")
    assert torch.equal(a.images, b.images) and a.images.device.type == "cpu"
    assert a.device["device"] == "cpu" and a.peak_memory_bytes is None


@pytest.mark.parametrize("method", METHODS.names())
def test_bf16_synthesis_runs_and_stays_close_to_fp32(model, method: str) -> None:
    cfg = data_config(model)
    fp32 = synthesize(model, cfg, method, small(iterations=3), progress=False)
    bf16 = synthesize(model, cfg, method, small(iterations=3, precision="bf16"), progress=False)
    assert bf16.options.precision == "bf16" and bf16.images.dtype == torch.float32
    assert torch.isfinite(bf16.images).all()
    assert not torch.equal(fp32.images, bf16.images)  # autocast really changed the arithmetic
    # the same starting images and targets: three Adam steps of lr ~0.2 cannot move them far apart
    assert (fp32.images - bf16.images).abs().max() < 1.0
    assert torch.equal(fp32.targets, bf16.targets)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(DfqError, match="precision='fp8'"):
        synthesize(torch.nn.Identity(), {}, "psaq", {"precision": "fp8"})


def test_resume_refuses_another_precision_and_reads_old_checkpoints_as_fp32(model, tmp_path) -> None:
    cfg = data_config(model)
    ckpt = tmp_path / "ckpt.pt"
    synthesize(model, cfg, "psaq", small(), checkpoint_path=ckpt, stop_after=3, progress=False)
    with pytest.raises(DfqError, match="precision: 'fp32' -> 'bf16'"):
        synthesize(model, cfg, "psaq", small(precision="bf16"), checkpoint_path=ckpt, resume=True, progress=False)
    # a checkpoint written before the option existed resumes as fp32
    saved = load_checkpoint(ckpt)
    del saved["options"]["precision"]
    save_checkpoint(ckpt, saved)
    resumed = synthesize(model, cfg, "psaq", small(), checkpoint_path=ckpt, resume=True, progress=False)
    straight = synthesize(model, cfg, "psaq", small(), progress=False)
    assert torch.equal(resumed.images, straight.images)


def test_checkpoints_hold_cpu_tensors(model, tmp_path) -> None:
    cfg = data_config(model)
    ckpt = tmp_path / "ckpt.pt"
    synthesize(model, cfg, "spdfq", small(), checkpoint_path=ckpt, stop_after=2, progress=False)
    saved = load_checkpoint(ckpt)
    tensors = [saved["params"], *saved["state"].values()]
    tensors += [v for s in saved["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


# --- GPU: the same tests on CUDA, and CPU/GPU agreement ----------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", METHODS.names())
def test_cuda_synthesis_agrees_with_the_cpu(model, method: str) -> None:
    cfg = data_config(model)
    cpu = synthesize(model, cfg, method, small(iterations=3), progress=False, device="cpu")
    gpu = synthesize(model, cfg, method, small(iterations=3), progress=False, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # moved there and back
    assert gpu.images.device.type == "cpu" and gpu.device["device"].startswith("cuda")
    assert gpu.peak_memory_bytes and gpu.peak_memory_bytes > 0
    assert torch.equal(cpu.targets, gpu.targets)  # drawn on the CPU: identical
    assert (cpu.images - gpu.images).abs().max() < DEVICE_ATOL
    for h1, h2 in zip(cpu.history, gpu.history, strict=True):
        assert h1["total"] == pytest.approx(h2["total"], rel=1e-2)


@pytest.mark.gpu
@requires_cuda
def test_a_cuda_checkpoint_resumes_on_the_cpu(model, tmp_path) -> None:
    cfg = data_config(model)
    ckpt = tmp_path / "ckpt.pt"
    synthesize(model, cfg, "dfqvit", small(), checkpoint_path=ckpt, stop_after=4, progress=False, device="cuda")
    res = synthesize(model, cfg, "dfqvit", small(), checkpoint_path=ckpt, resume=True, progress=False, device="cpu")
    straight = synthesize(model, cfg, "dfqvit", small(), progress=False, device="cpu")
    assert res.complete and (res.images - straight.images).abs().max() < DEVICE_ATOL


def test_resume_keeps_the_precision_the_run_started_with(model, tmp_path) -> None:
    """precision=None (the device's default) resumes in the checkpoint's precision, on any device."""
    cfg = data_config(model)
    ckpt = tmp_path / "ckpt.pt"
    synthesize(model, cfg, "psaq", small(precision="bf16"), checkpoint_path=ckpt, stop_after=3, progress=False)
    resumed = synthesize(model, cfg, "psaq", small(), checkpoint_path=ckpt, resume=True, progress=False)
    straight = synthesize(model, cfg, "psaq", small(precision="bf16"), progress=False)
    assert resumed.options.precision == "bf16" and torch.equal(resumed.images, straight.images)


def test_the_patch_similarity_entropy_stays_float32_under_bf16(model) -> None:
    from dfq_deploy.synth.attn import AttentionTaps, probe_attention
    from dfq_deploy.synth.method import synthesis_mode
    from dfq_deploy.synth.psaq import patch_similarity_entropy

    blocks, _ = probe_attention(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with synthesis_mode(model), AttentionTaps(model, outputs=True) as taps, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        ent = patch_similarity_entropy(taps, blocks, 2, [None] * len(blocks), 16, None)
    assert ent.dtype == torch.float32 and torch.isfinite(ent).all()
