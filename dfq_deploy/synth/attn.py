"""Where the synthesizers look inside a timm ViT/DeiT/Swin: attention geometry and forward-hook taps.

Synthesis runs the model with fused attention off, so every attention module computes its probabilities
explicitly and passes them through ``attn.attn_drop``: a forward hook on ``attn_drop`` sees the softmax
output, and a hook on the attention module itself sees the multi-head self-attention (MHSA) output.

Batch layouts seen by the hooks, for a batch of ``b`` images:

* ViT/DeiT ``Attention``: output ``(b, N, C)``, probabilities ``(b, heads, N, N)``; the first
  ``prefix`` tokens are the class (and distillation / register) tokens, the rest the patch grid.
* Swin ``WindowAttention``: output ``(b * windows, n, C)``, probabilities ``(b * windows, heads, n, n)``,
  image-major (the windows of image 0 first), ``n`` tokens per window and no class token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.swin_transformer import WindowAttention
from torch import nn

from dfq_deploy.errors import DfqError
from dfq_deploy.models import attention_modules


@dataclass(frozen=True)
class AttnBlock:
    """Geometry of one attention module, in forward order.

    Attributes:
        index: 0-based position among the model's attention modules (``l - 1`` in the papers' notation).
        kind: ``vit`` (global attention over all tokens) or ``swin`` (windowed attention).
        num_heads: attention heads.
        tokens: tokens per attention sequence (ViT: prefix + patches; Swin: tokens per window).
        windows: attention windows per image (1 for ViT).
        grid: ``(rows, cols)`` of the spatial tokens of one sequence (ViT: the patch grid; Swin: the window).
        prefix: leading non-spatial tokens (ViT class/distillation/register tokens; 0 for Swin).
        has_cls: the sequence starts with a class token.
    """

    index: int
    kind: Literal["vit", "swin"]
    num_heads: int
    tokens: int
    windows: int
    grid: tuple[int, int]
    prefix: int
    has_cls: bool

    @property
    def spatial(self) -> int:
        """Spatial tokens per sequence (``grid`` rows x cols)."""
        return self.grid[0] * self.grid[1]


class AttentionTaps:
    """Forward hooks that keep the latest MHSA outputs and/or attention probabilities of every block.

    Use as a context manager; the hooks are removed on exit. ``outputs[i]`` / ``probs[i]`` hold the tensors
    of the last forward pass through attention module ``i`` (graph attached, so losses can use them).

    Args:
        model: a timm ViT/DeiT/Swin.
        outputs: keep each attention module's output.
        probs: keep each attention module's softmax probabilities (needs fused attention off).
    """

    def __init__(self, model: nn.Module, outputs: bool = False, probs: bool = False) -> None:
        self.modules = attention_modules(model)
        self.want_outputs, self.want_probs = outputs, probs
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.probs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionTaps:
        for i, attn in enumerate(self.modules):
            if self.want_outputs:
                self._handles.append(attn.register_forward_hook(self._store(self.outputs, i)))
            if self.want_probs:
                drop = getattr(attn, "attn_drop", None)
                if drop is None:
                    raise DfqError(
                        f"attention module {type(attn).__name__} has no attn_drop: cannot read its probabilities"
                    )
                self._handles.append(drop.register_forward_hook(self._store(self.probs, i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    @staticmethod
    def _store(slot: list[torch.Tensor | None], i: int):  # noqa: ANN205 - hook factory
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            slot[i] = out

        return hook

    def clear(self) -> None:
        """Drop the stored tensors (and the autograd graphs they hold)."""
        for i in range(len(self.modules)):
            self.outputs[i] = None
            self.probs[i] = None

    def output(self, i: int) -> torch.Tensor:
        out = self.outputs[i]
        if out is None:
            raise RuntimeError(f"attention block {i} produced no output in the last forward pass")
        return out

    def prob(self, i: int) -> torch.Tensor:
        p = self.probs[i]
        if p is None:
            raise RuntimeError(
                f"attention block {i} produced no probabilities: fused attention must be off during synthesis"
            )
        return p


@torch.no_grad()
def probe_attention(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[list[AttnBlock], int]:
    """Run one blank image through ``model`` and describe every attention module.

    The model must already be in synthesis mode (eval, fused attention off).

    Returns:
        The attention blocks in forward order and the number of classes of the classifier.

    Raises:
        DfqError: the model has no timm attention modules, or a token layout that is not a grid.
    """
    mods = attention_modules(model)
    if not mods:
        raise DfqError(
            f"{type(model).__name__} has no timm Attention/WindowAttention modules: "
            "data-free synthesis needs a timm ViT, DeiT or Swin model"
        )
    with AttentionTaps(model, probs=True) as taps:
        logits = model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        shapes = [taps.prob(i).shape for i in range(len(mods))]
    if logits.ndim != 2:
        raise DfqError(f"model returns logits of shape {tuple(logits.shape)}: need (batch, classes)")
    blocks = []
    has_cls = getattr(model, "cls_token", None) is not None
    prefix = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    for i, (attn, shape) in enumerate(zip(mods, shapes, strict=True)):
        rows, heads, n = shape[0], shape[1], shape[-1]
        if isinstance(attn, WindowAttention):
            ws = tuple(int(v) for v in getattr(attn, "window_size", ()))
            grid = ws if len(ws) == 2 and ws[0] * ws[1] == n else _square(n, f"Swin window of block {i}")
            blocks.append(AttnBlock(i, "swin", heads, n, rows, grid, 0, False))  # type: ignore[arg-type]
        else:
            patch_embed = getattr(model, "patch_embed", None)
            grid = tuple(int(v) for v in getattr(patch_embed, "grid_size", ()) or ())
            if len(grid) != 2 or grid[0] * grid[1] != n - prefix:
                grid = _square(n - prefix, f"patch tokens of block {i}")
            blocks.append(AttnBlock(i, "vit", heads, n, 1, grid, prefix, has_cls))  # type: ignore[arg-type]
    return blocks, int(logits.shape[-1])


def _square(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise DfqError(f"{what}: {n} tokens do not form a square grid")
    return side, side


def is_swin(blocks: list[AttnBlock]) -> bool:
    return any(b.kind == "swin" for b in blocks)
