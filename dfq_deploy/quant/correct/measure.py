"""How far a quantized model is from its float twin, block by block: :func:`block_errors`, and its plot."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.device import model_device
from dfq_deploy.quant.correct.capture import batches, eval_mode, num_prefix_tokens
from dfq_deploy.quant.qmodel import quant_disabled, transformer_blocks
from dfq_deploy.utils import figure_png

logger = logging.getLogger(__name__)


# --- measuring ---------------------------------------------------------------------------------------------
class _ErrAcc:
    """Running squared error, reference energy and per-token cosine of one output."""

    def __init__(self) -> None:
        self.sq = self.ref = self.cos = 0.0
        self.numel = self.tokens = 0

    def add(self, q: torch.Tensor, f: torch.Tensor) -> None:
        q, f = q.float(), f.float()
        self.sq += float((q - f).pow(2).sum())
        self.ref += float(f.pow(2).sum())
        self.numel += f.numel()
        cos = F.cosine_similarity(q.reshape(-1, q.shape[-1]), f.reshape(-1, f.shape[-1]), dim=-1)
        self.cos += float(cos.sum())
        self.tokens += cos.numel()

    def figures(self) -> dict[str, float]:
        return {"mse": self.sq / max(1, self.numel), "nmse": self.sq / max(self.ref, 1e-30),
                "cos": self.cos / max(1, self.tokens)}


@torch.no_grad()
def block_errors(model: nn.Module, fp_model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[str, Any]:
    """Per-block output error of ``model`` against ``fp_model``, each fed the same images end to end.

    Args:
        model: the (fake-)quantized model.
        fp_model: the full-precision reference.
        images: inputs, ideally held back from calibration.
        batch_size: images per forward pass.

    Returns:
        ``{"blocks": [{"mse", "nmse", "cos"[, "cls_mse", "cls_nmse", "cls_cos"]}, ...],
        "logits": {"mse", "nmse", "cos", "top1_agreement"}}``: ``nmse`` is the MSE divided by the float output's
        mean square, ``cos`` the mean per-token cosine; ``cls_*`` the same on the prefix (class) tokens only.
    """
    qblocks, fblocks = transformer_blocks(model), transformer_blocks(fp_model)
    if len(qblocks) != len(fblocks):
        raise ValueError(f"found {len(qblocks)} / {len(fblocks)} transformer blocks in model / fp_model")
    accs = [_ErrAcc() for _ in range(len(qblocks) + 1)]
    n_prefix = num_prefix_tokens(model)
    cls_accs = [_ErrAcc() for _ in range(len(qblocks))] if n_prefix else []
    agree = 0
    outs: dict[tuple[int, int], torch.Tensor] = {}

    def grab(side: int, i: int):
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
            outs[(side, i)] = out.detach()

        return hook

    handles = [b.register_forward_hook(grab(s, i)) for s, blocks in enumerate((qblocks, fblocks))
               for i, b in enumerate(blocks)]
    try:
        with eval_mode(model, fp_model):
            for x in batches(images, batch_size, model_device(model)):
                outs.clear()
                lq = model(x)
                with quant_disabled(fp_model):
                    lf = fp_model(x)
                for i in range(len(qblocks)):
                    oq, of = outs[(0, i)], outs[(1, i)]
                    accs[i].add(oq, of)
                    if cls_accs and oq.ndim == 3:
                        cls_accs[i].add(oq[:, :n_prefix], of[:, :n_prefix])
                accs[-1].add(lq, lf)
                agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
    finally:
        for h in handles:
            h.remove()
    logits = accs[-1].figures()
    logits["top1_agreement"] = agree / max(1, len(images))
    blocks = [a.figures() for a in accs[:-1]]
    for b, c in zip(blocks, cls_accs, strict=False):
        if c.tokens:
            b.update({f"cls_{k}": v for k, v in c.figures().items()})
    return {"blocks": blocks, "logits": logits}


def plot_block_errors(report: dict[str, Any], title: str | None = None) -> bytes | None:
    """A PNG of the per-block error of each stage (``report["stages"]``: name -> :func:`block_errors` output).

    Left: normalised MSE per block (log scale; dashed: class token only). Right: mean per-token cosine.

    Returns:
        The PNG bytes, or None when matplotlib is not installed (logged).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no error plot (pip install 'dfq-deploy[plot]')")
        return None

    fig, (ax_mse, ax_cos) = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        for k, (stage, errs) in enumerate(report["stages"].items()):
            blocks = errs["blocks"]
            idx = list(range(len(blocks)))
            color = f"C{k}"
            label = f"{stage} (logits nmse {errs['logits']['nmse']:.2e})" if "nmse" in errs.get("logits", {}) else stage
            ax_mse.semilogy(idx, [max(b["nmse"], 1e-12) for b in blocks], "o-", color=color, label=label)
            if all("cls_nmse" in b for b in blocks):
                ax_mse.semilogy(idx, [max(b["cls_nmse"], 1e-12) for b in blocks], "x--", color=color, alpha=0.7)
            ax_cos.plot(idx, [b["cos"] for b in blocks], "o-", color=color, label=stage)
        ax_mse.set(xlabel="block", ylabel="MSE / mean square of float output", title="per-block error (-- class token)")
        ax_cos.set(xlabel="block", ylabel="cosine to float output", title="per-block cosine")
        for ax in (ax_mse, ax_cos):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title or f"correction: {report.get('mode', '?')}")
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return figure_png(fig, dpi=110)
