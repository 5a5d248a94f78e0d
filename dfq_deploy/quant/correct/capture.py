"""Running parts of a model: the inputs of a block or layer, captured by hooks that stop the forward pass.

Shared by the closed-form fits (:mod:`~dfq_deploy.quant.correct.fit`), the error report
(:mod:`~dfq_deploy.quant.correct.measure`) and block reconstruction (:mod:`~dfq_deploy.quant.correct.reconstruct`).
Calibration sets are CPU tensors; each batch moves to the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dfq_deploy.device import model_device
from dfq_deploy.quant.qmodel import QuantLinear


class _StopForwardError(Exception):
    """Raised by a hook to end a forward pass once the wanted activation was captured."""


# --- running parts of a model ------------------------------------------------------------------------------
def batches(images: torch.Tensor, batch_size: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Mini-batches of ``images`` (CPU calibration sets), moved to ``device`` (the model's) one at a time."""
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size].to(device) if device is not None else images[i : i + batch_size]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the ``with`` body and restore their train/eval flags afterwards."""
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(models, states, strict=True):
            m.train(s)


def run_capture(run: nn.Module, x: torch.Tensor, target: nn.Module) -> torch.Tensor:
    """Run ``run(x)`` until ``target`` is called and return ``target``'s first positional input."""
    box: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        box.append(args[0])
        raise _StopForwardError

    handle = target.register_forward_pre_hook(hook)
    try:
        run(x)
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{type(target).__name__} was not reached by the forward pass")
    return box[0].detach()


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Inputs of ``block`` for ``images`` (the model is run only up to the block)."""
    return torch.cat([run_capture(model, x, block) for x in batches(images, batch_size, model_device(model))])


def check_separate(model: nn.Module, fp_model: nn.Module) -> None:
    """Raise when ``model`` and ``fp_model`` share parameter storage (corrections would leak into the target).

    Raises:
        ValueError: a parameter of one is a parameter of the other.
    """
    ptrs = {p.data_ptr() for p in fp_model.parameters()}
    if any(p.data_ptr() in ptrs for p in model.parameters()):
        raise ValueError("model and fp_model share parameters: pass a copy.deepcopy of the float model "
                         "taken before quantize()")


def num_prefix_tokens(model: nn.Module) -> int:
    """Class/distillation tokens at the start of each sequence (0 for Swin and pooled-only models)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def named_block_linears(model: nn.Module, block: nn.Module) -> list[tuple[str, QuantLinear]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in block.modules() if isinstance(m, QuantLinear)]
