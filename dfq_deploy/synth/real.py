"""``real``: images from an ImageFolder directory, the upper bound that data-free methods are compared with."""

from __future__ import annotations

from torch import nn

from dfq_deploy.data import load_images
from dfq_deploy.errors import DfqError
from dfq_deploy.synth.base import CalibRequest, CalibSet, register_synthesizer


@register_synthesizer("real")
def real_images(model: nn.Module, req: CalibRequest) -> CalibSet:
    if req.calib_dir is None:
        raise DfqError("--calib real needs --calib-dir DIR (an ImageFolder directory)")
    images, labels = load_images(req.calib_dir, req.data_cfg, limit=req.num_samples, seed=req.seed)
    return CalibSet(images, labels, meta={"source": "real", "dir": str(req.calib_dir), "seed": req.seed})
