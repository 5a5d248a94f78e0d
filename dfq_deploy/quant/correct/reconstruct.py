"""Block-wise reconstruction by gradient descent: the fine-tuning baseline for the closed-form corrections.

Block by block, in forward order, the quantized block is fed the outputs of the already reconstructed
quantized blocks before it, and its Linear weights and biases are trained to minimise
``||X_l - X_hat_l||^2`` against the full-precision block's output on full-precision inputs (Adam, cosine
decay of the learning rate, straight-through gradients through every fake quantizer). The weight scales are
then re-chosen for the new weights, but kept only when that does not raise the block's loss: on tiny models the
trained weights have adapted to their rounding grid and a fresh range search usually undoes most of the gain.
Only the Linear parameters of the block change, so the exported graph keeps its shape.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.progress import Progress
from dfq_deploy.quant.correct.capture import block_inputs, check_separate, eval_mode
from dfq_deploy.quant.qmodel import QuantLinear, quant_disabled, transformer_blocks

logger = logging.getLogger(__name__)


@torch.no_grad()
def _block_outputs(block: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([block(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _try_rescale(
    block: nn.Module, lins: list[QuantLinear], xq: torch.Tensor, target: torch.Tensor, batch_size: int, loss: float
) -> tuple[bool, float]:
    """Re-choose the block's weight scales; keep them only if the calibration loss does not grow."""
    old = [None if lin.weight_quantizer is None else lin.weight_quantizer.scale.clone() for lin in lins]
    for lin in lins:
        if lin.weight_quantizer is not None:
            lin.weight_quantizer.calibrate(lin.weight.detach())
    new_loss = float(F.mse_loss(_block_outputs(block, xq, batch_size), target))
    if new_loss <= loss:
        return True, new_loss
    for lin, scale in zip(lins, old, strict=True):
        if lin.weight_quantizer is not None:
            lin.weight_quantizer.scale = scale
    return False, loss


def reconstruct_(
    model: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    iters: int = 100,
    lr: float = 4e-5,
    batch_size: int = 32,
    rescale: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Train each quantized block's Linear weights to reproduce the full-precision block outputs, in place.

    Args:
        model: the fake-quant model (quantizers calibrated and enabled).
        fp_model: its full-precision twin (a deep copy taken before ``quantize``).
        images: calibration images in model space.
        iters: Adam steps per block.
        lr: initial learning rate (cosine decay to 0 over ``iters``).
        batch_size: images per step (a random subset each step when there are more).
        rescale: re-choose the weight scales of the block after training, kept only when they do not raise the
            block's calibration loss (they usually do: the trained weights have adapted to the old grid).
        seed: seed of the mini-batch sampling.

    Returns:
        ``{"iters", "lr", "blocks": [{"loss_start", "loss_end", "rescaled", "seconds"}], "total_s"}`` (losses
        on the calibration images before and after, with the final weight scales; ``rescaled``: whether the
        re-chosen weight scales were kept).

    Raises:
        ValueError: shared parameters between ``model`` and ``fp_model``, or no transformer blocks.
    """
    check_separate(model, fp_model)
    qblocks, fblocks = transformer_blocks(model), transformer_blocks(fp_model)
    if not qblocks or len(qblocks) != len(fblocks):
        raise ValueError(f"found {len(qblocks)} / {len(fblocks)} transformer blocks in model / fp_model")
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"iters": iters, "lr": lr, "blocks": []}
    t_all = time.perf_counter()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with eval_mode(model, fp_model), Progress(len(qblocks), f"reconstruct ({iters} steps a block)", "blocks",
                                                  logger, every_s=0) as prog:
            for i, (qb, fb) in enumerate(zip(qblocks, fblocks, strict=True)):
                t = time.perf_counter()
                xq = block_inputs(model, qb, images, batch_size)
                with quant_disabled(fp_model):
                    target = _block_outputs(fb, block_inputs(fp_model, fb, images, batch_size), batch_size)
                lins = [m for m in qb.modules() if isinstance(m, QuantLinear)]
                params = [p for lin in lins for p in (lin.weight, lin.bias) if p is not None]
                loss_start = float(F.mse_loss(_block_outputs(qb, xq, batch_size), target))
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
                for _ in range(iters):
                    idx = torch.randperm(len(xq), generator=gen)[:batch_size]
                    loss = F.mse_loss(qb(xq[idx]), target[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
                loss_end = float(F.mse_loss(_block_outputs(qb, xq, batch_size), target))
                rescaled = False
                if rescale:
                    rescaled, loss_end = _try_rescale(qb, lins, xq, target, batch_size, loss_end)
                report["blocks"].append({"loss_start": loss_start, "loss_end": loss_end, "rescaled": rescaled,
                                         "seconds": time.perf_counter() - t})
                logger.debug("reconstructed block %d/%d: mse %.3g -> %.3g", i + 1, len(qblocks), loss_start, loss_end)
                prog.update()
    finally:
        for p, state in frozen:
            p.requires_grad_(state)
    report["total_s"] = time.perf_counter() - t_all
    return report
