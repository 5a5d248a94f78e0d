"""The model's preprocessing, written out for servers that do not run timm: a JSON recipe and nvinfer's arithmetic.

timm's evaluation transform (``timm.data.create_transform(**data_config, is_training=False)``, what
``dfq-deploy eval`` and the parity check feed the model) is, for the centre-crop mode every timm ViT uses:

1. resize with the config's interpolation so that the shorter side is ``floor(size / crop_pct)`` (a square input;
   ``squash`` mode resizes both sides to ``floor(size / crop_pct)`` instead),
2. crop the centre ``size x size`` (offsets rounded as torchvision's ``CenterCrop``),
3. RGB to float in [0, 1] (``/255``), then ``(x - mean[c]) / std[c]`` per channel, CHW layout.

:func:`preprocess_recipe` writes that as plain data (``preprocess.json`` beside a Triton model; what
``examples/triton_client.py`` follows). :func:`nvinfer_normalization` turns step 3 into DeepStream's
``y = net-scale-factor * (x - offsets[c])`` on 0-255 pixels: ``offsets[c] = 255 * mean[c]`` is exact, but nvinfer has
one scale factor for all channels, so a per-channel std is approximated by ``1 / (255 * s)`` with ``s`` halfway
between the smallest and the largest std (the choice that minimises the largest relative error) and that error is
reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dfq_deploy.errors import DfqError
from dfq_deploy.serve.artifact import ServedModel

#: timm's crop_pct when a data config has none (``timm.data.transforms_factory``).
DEFAULT_CROP_PCT = 0.875
#: Interpolations the recipe names (timm's names; the example client maps them to PIL's filters).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RECIPE_FORMAT = "dfq-deploy preprocess 1"


def _floats(cfg: dict[str, Any], key: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in cfg[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise DfqError(f"the model's data config has no numeric '{key}' list: re-export it with dfq-deploy "
                       "export") from exc
    if len(vals) != 3 or (key == "std" and any(v <= 0 for v in vals)):
        raise DfqError(f"the model's data config '{key}' is {list(vals)}: expected 3 channel values (std > 0)")
    return vals


def preprocess_recipe(model: ServedModel) -> dict[str, Any]:
    """The preprocessing of ``model`` as plain data (``preprocess.json``; see the module docstring).

    Raises:
        DfqError: a data config without 3-channel mean/std, a non-square or unknown input size, or an interpolation
            or crop mode the recipe cannot express.
    """
    cfg = model.data_config
    c, h, w = (int(v) for v in cfg["input_size"])
    if c != 3 or h != w:
        raise DfqError(f"the model takes {list(cfg['input_size'])}: the serving recipe covers square RGB inputs")
    if tuple(model.input.shape[1:]) != (c, h, w):
        raise DfqError(f"input '{model.input.name}' is {list(model.input.shape)} but the data config says "
                       f"{[c, h, w]}: re-export the model")
    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    crop_mode = str(cfg.get("crop_mode") or "center")
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise DfqError(f"interpolation '{interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
    if crop_mode not in ("center", "squash"):
        raise DfqError(f"crop mode '{crop_mode}' is not supported by the serving recipe (center, squash)")
    scale = math.floor(h / crop_pct)
    resize = ({"shorter_side": scale} if crop_mode == "center" else {"height": scale, "width": scale})
    mean, std = _floats(cfg, "mean"), _floats(cfg, "std")
    out = model.outputs[0]
    return {
        "format": RECIPE_FORMAT,
        "input": {"name": model.input.name, "dtype": model.input.dtype, "layout": "NCHW", "color": "RGB",
                  "shape": [c, h, w]},
        "resize": {**resize, "interpolation": interpolation},
        "crop": {"height": h, "width": w, "mode": "center"},
        "scale": 1 / 255,
        "mean": list(mean),
        "std": list(std),
        "output": {"name": out.name, "dtype": out.dtype, "shape": [d if d is not None else -1 for d in out.shape],
                   "meaning": "logits (no softmax)"},
        "steps": [
            "convert the image to RGB",
            (f"resize ({interpolation}) so that the shorter side is {scale}" if crop_mode == "center"
             else f"resize ({interpolation}) to {scale}x{scale}"),
            f"crop the centre {h}x{w} (offsets round((side - {h}) / 2))",
            "divide by 255, subtract mean and divide by std per channel (RGB order)",
            "HWC to CHW, float32, stack images on a first batch dimension",
        ],
        "timm_data_config": cfg,
    }


@dataclass(frozen=True)
class NvinferNormalization:
    """DeepStream's ``y = net_scale_factor * (x - offsets[c])`` on 0-255 pixels, against timm's normalisation.

    Attributes:
        net_scale_factor: the one scale factor (``1 / (255 * s)``).
        offsets: ``255 * mean[c]`` per channel (RGB).
        relative_error: per channel, ``net_scale_factor * 255 * std[c] - 1``: how much larger (or, negative,
            smaller) nvinfer's values are than timm's, relative to them, after the mean is removed.
    """

    net_scale_factor: float
    offsets: tuple[float, ...]
    relative_error: tuple[float, ...]

    @property
    def exact(self) -> bool:
        return max(abs(e) for e in self.relative_error) < 1e-9

    @property
    def max_relative_error(self) -> float:
        return max(abs(e) for e in self.relative_error)


def nvinfer_normalization(mean: tuple[float, ...] | list[float],
                          std: tuple[float, ...] | list[float]) -> NvinferNormalization:
    """nvinfer's scale factor and offsets for timm's ``mean``/``std`` (module docstring)."""
    mean = tuple(float(v) for v in mean)
    std = tuple(float(v) for v in std)
    s = (min(std) + max(std)) / 2
    factor = 1.0 / (255.0 * s)
    return NvinferNormalization(factor, tuple(255.0 * m for m in mean), tuple(v / s - 1.0 for v in std))
