"""Models: timm names and aliases, checkpoints, data configs, and the bundled CIFAR-10 ViT.

timm is the source of truth: every model is built with :func:`timm.create_model` and its preprocessing
comes from :func:`timm.data.resolve_model_data_config`. The project's own trained model,
``deit_tiny_cifar10``, is registered here with timm's ``@register_model`` pattern and its weights ship
inside the package, so ``timm.create_model("deit_tiny_cifar10", pretrained=True)`` works offline.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from timm.layers import Attention
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import _create_vision_transformer
from torch import nn

from dfq_deploy.config import BUNDLED_MODEL  # re-exported: timm's registry name of the bundled model
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED_WEIGHTS = WEIGHTS_DIR / "deit_tiny_cifar10.safetensors"

#: Short names accepted by ``--model``; anything else is passed to timm as is.
ALIASES: dict[str, str] = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}

#: One tiny configuration per model family (random weights, 32x32 inputs, 2 blocks or stages), for tests and
#: benchmarks that must cover DeiT with a class token, ViT without one (average pooling) and Swin's windows.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit": ("deit_t", {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}),
    "vit_avgpool": ("vit_s", {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10, "embed_dim": 64,
                              "num_heads": 2, "class_token": False, "global_pool": "avg"}),
    "swin": ("swin_t", {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 32, "depths": (2, 2),
                        "num_heads": (2, 4), "num_classes": 10}),
}

# --- the bundled model ------------------------------------------------------------------------------------
#: Architecture of ``deit_tiny_cifar10``: DeiT-Tiny widths (192 wide, 3 heads) on 32x32 inputs, patch 4.
BUNDLED_ARCH: dict[str, Any] = dict(
    img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4, num_classes=10
)

#: CIFAR-10's classes in label order (alphabetical, as the shared ImageFolder's class folders are named).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

default_cfgs = generate_default_cfgs(
    {
        f"{BUNDLED_MODEL}.dfq_cifar10": {
            "file": str(BUNDLED_WEIGHTS),
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": None,
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "fixed_input_size": True,
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "label_names": CIFAR10_CLASSES,
            "license": "apache-2.0",
        }
    }
)


@register_model
def deit_tiny_cifar10(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """DeiT-Tiny-width ViT trained on CIFAR-10 by ``experiments/train_teacher.py``; weights ship in the package."""
    args = dict(BUNDLED_ARCH)
    args.update(kwargs)
    return _create_vision_transformer(BUNDLED_MODEL, pretrained=pretrained, **args)


# --- resolution and loading -------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """What ``--model``/``--checkpoint``/``--model-kwargs``/``--random-weights`` ask for.

    Attributes:
        name: timm model name or one of :data:`ALIASES`.
        checkpoint: local safetensors or torch state-dict file, or None.
        kwargs: architecture overrides passed to ``timm.create_model``.
        random_weights: build with random initialisation (tests, speed benchmarks).
    """

    name: str = BUNDLED_MODEL
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False

    @property
    def timm_name(self) -> str:
        return resolve_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "checkpoint": self.checkpoint,
            "kwargs": dict(self.kwargs),
            "random_weights": self.random_weights,
        }


def resolve_name(name: str) -> str:
    """Map an alias to its timm name and check that timm knows it.

    Raises:
        DfqError: the name is neither an alias nor a registered timm model.
    """
    full = ALIASES.get(name, name)
    if not timm.is_model(full.split(".")[0]):
        close = similar_models(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DfqError(f"unknown model '{name}': use the bundled {BUNDLED_MODEL}, an alias "
                       f"({', '.join(ALIASES)}) or a timm model name{hint}")
    return full


def similar_models(name: str, n: int = 5) -> list[str]:
    """Names close to a mistyped ``name``: the bundled model and the aliases first, then timm's ViT, DeiT and Swin
    models (the families this tool quantizes)."""
    import difflib

    own = difflib.get_close_matches(name, [BUNDLED_MODEL, *ALIASES], n=3, cutoff=0.6)
    family = timm.list_models(["*vit*", "*deit*", "*swin*"])
    others = [m for m in difflib.get_close_matches(name, family, n=n, cutoff=0.6) if m not in own]
    return (own + others)[:n]


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``img_size=32,patch_size=4,depth=6`` into a dict with ints, floats and bools converted.

    Raises:
        DfqError: an item is not of the form ``key=value``.
    """
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise DfqError(f"bad --model-kwargs item '{item}': write key=value pairs separated by commas")
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def require_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a Path, or a one-line :class:`DfqError` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise DfqError(f"checkpoint not found: {path} (pass an existing file to --checkpoint)")
    return path


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch checkpoint and return its state dict.

    Accepts plain state dicts and the usual wrappers (``state_dict``, ``model``, ``state_dict_ema``).

    Raises:
        DfqError: the file is missing, unreadable or holds no tensors.
    """
    path = require_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, truncated download ...
        raise DfqError(
            f"checkpoint {path} could not be read ({type(exc).__name__}): re-download or re-save it"
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise DfqError(f"checkpoint {path} holds no weight tensors: pass a state dict or safetensors file")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def create_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model a :class:`ModelSpec` describes, in eval mode, with fused attention off.

    Raises:
        DfqError: unknown name, bad architecture overrides, unreadable or mismatching checkpoint, or no
            pretrained weights available offline.
    """
    name = spec.timm_name
    pretrained = not spec.random_weights and spec.checkpoint is None
    if pretrained and _needs_hub(name) and not hub_reachable():
        # No network: let huggingface_hub answer from its cache at once instead of retrying for a minute.
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **spec.kwargs)
    except DfqError:
        raise
    except TypeError as exc:
        raise DfqError(f"bad --model-kwargs for {name}: {exc}") from exc
    except Exception as exc:
        if pretrained:
            raise DfqError(
                f"no pretrained weights for '{name}' available offline ({type(exc).__name__}): "
                "pass local weights with --checkpoint FILE (or --random-weights for speed tests)"
            ) from exc
        raise DfqError(f"could not build '{name}' with {spec.kwargs}: {exc}") from exc
    if spec.checkpoint is not None:
        state = load_checkpoint_file(spec.checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise DfqError(
                f"checkpoint {spec.checkpoint} does not match {name} {spec.kwargs or ''}: {first} "
                "(check --model and --model-kwargs)"
            ) from exc
    set_fused_attn_(model, False)
    model.eval()
    logger.info("built %s (%.2fM params)", name, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _needs_hub(name: str) -> bool:
    """True when ``name``'s pretrained weights come from the model hub (not a file inside a package)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    except Exception:  # timm versions without a default cfg for this name
        return True
    return not (cfg and getattr(cfg, "file", None))


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (asked once per process).

    ``HF_HUB_OFFLINE=1`` answers False without asking.
    """
    import urllib.error
    import urllib.request

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        logger.info("the model hub at %s is unreachable: using cached weights only", hub.ENDPOINT)
        return False
    return True


def set_fused_attn_(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Turn timm's fused attention on or off in every attention module of ``model`` (in place).

    Unfused attention computes ``softmax(q*scale @ k^T) @ v`` explicitly, which exports as two MatMuls and
    lets hooks see the attention probabilities.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
    return model


def class_names(model: torch.nn.Module) -> list[str] | None:
    """The model's class names in label order, or None when timm does not know them.

    From the pretrained config's ``label_names`` (the bundled model: CIFAR-10's classes), else timm's ImageNet
    info for ImageNet heads (WordNet ids such as ``n01440764``, the class folder names of ImageNet's ImageFolder
    layout); a head whose size does not match has none.
    """
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num = getattr(model, "num_classes", None)
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if not names:
        subset = infer_imagenet_subset(model)
        names = ImageNetInfo(subset).label_names() if subset else None
    return list(names) if names and len(names) == num else None


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """timm's data config (input size, mean, std, interpolation, crop) for ``model``.

    The input size follows the built model (``--model-kwargs img_size=32``), not its pretrained default.
    """
    cfg = resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *tuple(img_size))
    return cfg


# --- model structure -------------------------------------------------------------------------------------
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules (ViT/DeiT ``Attention``, Swin ``WindowAttention``) in forward order."""
    return [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks (modules with an ``attn`` attention child and an ``mlp`` child) in forward order.

    ViT/DeiT ``Block`` and Swin ``SwinTransformerBlock`` qualify; each takes one tensor and returns one.
    """
    attns = {id(a) for a in attention_modules(model)}
    return [m for m in model.modules() if id(getattr(m, "attn", None)) in attns and hasattr(m, "mlp")]
