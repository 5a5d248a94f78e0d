"""What synthesis costs on a device: seconds per iteration, peak memory, and the ratio to a forward+backward.

The baseline is one plain forward + backward of the same model on the same number of images of the same size
(cross-entropy on random targets, the gradient w.r.t. the input images, the model in synthesis mode: eval,
unfused attention, frozen weights; no optimizer step), run with the same numerics (fp32 or bf16 autocast).
A method's seconds per iteration is the median time between consecutive optimizer steps of the real code path
(:func:`dfq_deploy.synth.synthesize`), after ``warmup`` dropped iterations. On CUDA every timing is
synchronised and the peak is ``torch.cuda.max_memory_allocated`` of each phase; on the CPU the caller measures
peak RSS (``experiments/synth_devices.py`` runs each row in a process of its own).

Used by ``experiments/synth_devices.py`` (rows per device and model) and ``experiments/cost.py`` (every method,
one model).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from dfq_deploy.device import (
    describe_device,
    model_device,
    peak_memory_bytes,
    peak_memory_reset,
    synchronize,
    synthesis_numerics,
)
from dfq_deploy.synth import method_options, synthesize
from dfq_deploy.synth.method import synthesis_mode

logger = logging.getLogger(__name__)

#: The per-iteration cost target of the synthesis methods: at most this times a plain forward+backward.
TARGET_RATIO = 1.3


class StepTimer:
    """Wall time between consecutive ``torch.optim`` steps anywhere in the process (one synthesis iteration).

    ``times[j]`` is the duration of 0-based iteration ``j + 1`` (iteration 0 has no previous step to start from).
    On CUDA the device is synchronised at each step, so a step's time includes its kernels.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.times: list[float] = []
        self._last: float | None = None
        self._handle: Any = None

    def _hook(self, _opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def __enter__(self) -> StepTimer:
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def drop_warmup(times: list[float], warmup: int) -> list[float]:
    """Drop the first ``warmup`` entries, but always keep at least one."""
    return times[min(warmup, max(len(times) - 1, 0)) :]


def time_baseline(model: nn.Module, dcfg: dict[str, Any], n: int, iters: int, seed: int,
                  precision: str = "fp32") -> list[float]:
    """Seconds of each of ``iters`` plain forward+backward passes on the model's device."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *dcfg["input_size"]), generator=gen).to(device).requires_grad_(True)
    times = []
    with synthesis_mode(model):
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        y = torch.randint(0, classes, (n,), generator=gen).to(device)
        for _ in range(iters):
            synchronize(device)
            t0 = time.perf_counter()
            x.grad = None
            with synthesis_numerics(device, precision):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def device_row(model: nn.Module, dcfg: dict[str, Any], method: str = "dfqvit", num_samples: int = 32,
               iters: int = 3, warmup: int = 1, precision: str = "fp32", seed: int = 0,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the device table: baseline and method seconds per iteration, their ratio, peak memory.

    ``dfqvit`` runs its detail stage (``global_frac=0``): the full-resolution stage with the patch-similarity
    entropy, 70% of its default schedule and the costlier one (the global stage renders low-resolution images
    upsampled to full size, so the model costs the same there and the entropy term is off).

    Args:
        model: a timm model on the device to measure.
        dcfg: its data config.
        method: the synthesis method.
        num_samples: images per iteration (one pass, no chunks, unless ``options`` sets ``batch_size``).
        iters: timed iterations after ``warmup``.
        warmup: leading iterations dropped (compilation, allocator warm-up).
        precision: ``fp32`` or ``bf16`` (both the method and its baseline).
        seed: seed of the images and the method.
        options: further method options.
    """
    device = model_device(model)
    opts = {"global_frac": 0.0} if method == "dfqvit" else {}
    opts.update(options or {})
    # the baseline before and after the method, one median of both: whichever runs first in a process pays for
    # the allocator's first touch of its memory (page faults on the CPU), which skewed a one-sided ratio by up to
    # 1.4x on this 2-core VM (baseline first: 0.9x, method first: 1.37x for DeiT-T at 224 px)
    peak_memory_reset(device)
    before = time_baseline(model, dcfg, num_samples, warmup + iters, seed, precision)
    base_peak = peak_memory_bytes(device)
    synth_opts = method_options(method, {"batch_size": 0, **opts, "precision": precision}, num_samples=num_samples,
                                seed=seed, iterations=warmup + iters + 1)  # one pass, as the baseline's
    peak_memory_reset(device)
    with StepTimer(device) as timer:
        res = synthesize(model, dcfg, method, synth_opts, progress=False)
    method_peak = peak_memory_bytes(device)
    after = time_baseline(model, dcfg, num_samples, iters, seed, precision)
    base = drop_warmup(before, warmup) + after
    base_s = statistics.median(base)
    method_s = statistics.median(drop_warmup(timer.times, warmup))
    row = {
        "model": getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input_size": list(dcfg["input_size"]),
        "method": method, "options": opts, "precision": precision, "num_samples": num_samples,
        "images_per_pass": res.device.get("images_per_pass", num_samples),
        "device": describe_device(device),
        "baseline_s_per_it": base_s, "method_s_per_it": method_s, "ratio": method_s / base_s,
        "target_ratio": TARGET_RATIO, "meets_target": method_s / base_s <= TARGET_RATIO,
        "images_x_iters_per_s": num_samples / method_s,
        "baseline_peak_bytes": base_peak, "method_peak_bytes": method_peak,
        "baseline_times_s": {"before": before, "after": after}, "method_times_s": timer.times, "warmup": warmup,
    }
    logger.info("%s %s %s: baseline %.3f s/it, %s %.3f s/it (x%.2f)%s", row["model"], device, precision, base_s,
                method, method_s, row["ratio"],
                f", peak {method_peak / 2**30:.2f} GiB" if method_peak else "")
    return row
