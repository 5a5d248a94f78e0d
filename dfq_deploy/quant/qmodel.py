"""Wrap a timm ViT/DeiT/Swin with fake quantizers, calibrate them, and switch them on.

The entry point has torchao / Model Optimizer's shape::

    model = quantize(model, W8A8, forward_loop=lambda m: [m(x) for x in batches])

Every ``nn.Linear`` inside the transformer blocks (qkv, proj, fc1, fc2; Swin's patch-merging reduction too)
becomes a :class:`QuantLinear`; the classifier head and the patch embedding stay in float unless
``QuantConfig.io_bits`` is set (the papers' protocol; then the head is a :class:`QuantLinear` and the patch
embedding's convolution a :class:`QuantConv2d`, weights and inputs at that width). When activations
are quantized with scope ``matmul``, each attention module also quantizes the inputs of its two matmuls
(``q*scale``, ``k``, the softmax output and ``v``), in the same places where the exported ONNX graph gets
its Q/DQ pairs.

Activation ranges are observed on the full-precision model (``a_calib="float"``) or, with ``"sequential"``,
group by group in forward order on the quantized model: each transformer block's quantizers see the inputs that
the already quantized blocks before it produce (:func:`calibrate_activations_`).
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from dfq_deploy.config import QuantConfig
from dfq_deploy.device import exact_float32, model_device
from dfq_deploy.models import attention_modules, transformer_blocks  # noqa: F401  (re-exported)
from dfq_deploy.quant.quantizers import ActQuantizer, WeightQuantizer

logger = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], None]


class QuantLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters) with an optional input quantizer and weight quantizer.

    ``correction`` is normally None. While a closed-form correction is pending (fitted by
    :func:`dfq_deploy.quant.correct.fit_corrections_`, not yet folded), it holds a
    :class:`dfq_deploy.quant.correct.fold.LinearCorrection`: its input part lives in the weight that is quantized
    (``Q_w(W M)``, bias ``b + W c``), its output part (``s * y + t``) is applied to the output.
    :func:`dfq_deploy.quant.correct.fold.fold_corrections_` writes both into ``weight``/``bias``/weight scales.
    """

    input_quantizer: ActQuantizer | None
    weight_quantizer: WeightQuantizer | None
    correction: nn.Module | None

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: QuantConfig) -> QuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.weight_quantizer = None
        if cfg.w_bits is not None:
            block = None
            if cfg.w_granularity == "blockwise":
                block = fit_block(cfg.block_size, lin.in_features)
            new.weight_quantizer = WeightQuantizer(cfg.w_bits, block, cfg.w_range, fmt=cfg.w_format)
        new.input_quantizer = None
        if cfg.a_bits is not None:
            new.input_quantizer = _act_quantizer(cfg)
        new.correction = None
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        corr = getattr(self, "correction", None)
        if corr is None:
            w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
            return F.linear(x, w, self.bias)
        w, b = corr.input_folded(self.weight, self.bias)
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
        return corr.apply_output(F.linear(x, w, b))


class QuantConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters) with an input quantizer and a per-output-channel weight quantizer: the
    patch embedding under the papers' protocol (``QuantConfig.io_bits``; simulation only)."""

    input_quantizer: ActQuantizer | None
    weight_quantizer: WeightQuantizer | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, cfg: QuantConfig) -> QuantConv2d:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, attr, getattr(conv, attr))
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_quantizer = None if cfg.w_bits is None else WeightQuantizer(cfg.w_bits, None, cfg.w_range)
        new.input_quantizer = None if cfg.a_bits is None else _act_quantizer(cfg)
        return new

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight.flatten(1)).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)


def _act_quantizer(cfg: QuantConfig, log2: bool = False) -> ActQuantizer:
    assert cfg.a_bits is not None
    return ActQuantizer(cfg.a_bits, cfg.a_range, cfg.a_percentile, log2=log2, asymmetric=cfg.a_grid == "asymmetric",
                        fmt=cfg.a_format)


@functools.cache
def fit_block(block_size: int, in_features: int) -> int:
    """The configured block size, or the largest power of two below it that divides ``in_features`` (logged once).

    Powers of two keep ONNX Runtime's MatMulNBits kernel (it takes 16..256) and TensorRT's blocked INT4 happy.
    """
    if in_features % block_size == 0:
        return block_size
    b = 1 << (min(block_size, in_features).bit_length() - 1)
    while b >= 2:
        if in_features % b == 0:
            logger.warning("block size %d does not divide %d inputs: using %d for those layers", block_size,
                           in_features, b)
            return b
        b >>= 1
    raise ValueError(f"no even block size divides {in_features}")


# --- attention ---------------------------------------------------------------------------------------------
def _attach_attn_quantizers(attn: nn.Module, cfg: QuantConfig) -> None:
    attn.q_quant = _act_quantizer(cfg)
    attn.k_quant = _act_quantizer(cfg)
    attn.p_quant = _act_quantizer(cfg, log2=cfg.attn_log2)
    if cfg.a_format == "fp8":  # the softmax output's FP8 scale is fixed to 1 / 448 (amax 1.0), as Model Optimizer
        # exports it (modelopt/torch/quantization/export_onnx.py: "Softmax's output scale is hard coded to 1.0")
        attn.p_quant.fixed_range = (0.0, 1.0)
    attn.v_quant = _act_quantizer(cfg)
    fwd = _vit_attention_forward if isinstance(attn, Attention) else _swin_attention_forward
    attn.forward = types.MethodType(fwd, attn)


def _vit_attention_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` (unfused branch) with the four matmul inputs quantized."""
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q = self.q_quant(q * self.scale)
    attn = q @ self.k_quant(k).transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = self.p_quant(attn) @ self.v_quant(v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _swin_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``WindowAttention.forward`` (unfused branch) with the four matmul inputs quantized."""
    B_, N, _ = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = self.q_quant(q * self.scale)
    attn = q @ self.k_quant(k).transpose(-2, -1)
    attn = attn + self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = self.p_quant(attn) @ self.v_quant(v)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    return self.proj_drop(self.proj(x))


# --- model-level API ---------------------------------------------------------------------------------------
def _quantizable_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear, str]]:
    """``(parent, child name, Linear, full module name)`` of every block Linear, in module order."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for parent_name, parent in model.named_modules():
        if not parent_name.startswith(("blocks", "layers", "stages")):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, QuantLinear) and child is not head:
                yield parent, child_name, child, f"{parent_name}.{child_name}"


def quant_units(model: nn.Module) -> list[tuple[str, str]]:
    """The quantizable units of a float timm model, in module order: ``(name, kind)`` with kind ``linear`` (a block
    Linear: weight and input) or ``attn`` (an attention module's matmul group). These are the names
    :attr:`~dfq_deploy.config.QuantConfig.layers` overrides match."""
    units = [(full, "linear") for _, _, _, full in _quantizable_linears(model)]
    attn_names = {id(a) for a in attention_modules(model)}
    units += [(n, "attn") for n, m in model.named_modules() if id(m) in attn_names]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(units, key=lambda u: order[u[0]])


def _quantize_patch_embed_(model: nn.Module, cfg: QuantConfig) -> None:
    """Replace the patch embedding's convolution by a :class:`QuantConv2d` (in place; papers' protocol).

    Its input is the normalised image, whose range is known without data: ``[(0 - mean) / std, (1 - mean) / std]``
    over the channels of timm's data config. The input quantizer takes that range rather than the calibration
    images' (synthetic images are not bound to the pixel range, and a range from them would cost real inputs
    levels).
    """
    from dfq_deploy.models import data_config
    from dfq_deploy.synth.priors import valid_range

    embed = getattr(model, "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, QuantConv2d):
        raise ValueError("io_bits: the model has no patch_embed.proj convolution to quantize")
    qconv = QuantConv2d.from_conv(conv, cfg)
    if qconv.input_quantizer is not None:
        lo, hi = valid_range(data_config(model))
        qconv.input_quantizer.fixed_range = (float(lo.min()), float(hi.max()))
    embed.proj = qconv


def _quantize_head_(model: nn.Module, head_cfg: QuantConfig) -> None:
    """Replace the classifier head's Linear by a per-channel QuantLinear with ``head_cfg``'s weights and inputs
    (in place)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear) or isinstance(head, QuantLinear):
        return
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is head:
                setattr(parent, child_name, QuantLinear.from_linear(head, head_cfg))
                return


def prepare_(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Insert (still inactive) quantizers into ``model`` in place.

    Raises:
        ValueError: the model has no Linear layers inside blocks (not a timm transformer).
    """
    from dfq_deploy.models import set_fused_attn_

    set_fused_attn_(model, False)
    model.dfq_config = cfg
    if cfg.is_float:
        return model
    found = list(_quantizable_linears(model))
    n = 0
    for parent, name, lin, full in found:
        layer_cfg = cfg.for_layer(full)
        if layer_cfg.w_bits is not None or layer_cfg.a_bits is not None:
            setattr(parent, name, QuantLinear.from_linear(lin, layer_cfg))
            n += 1
    if not found:
        raise ValueError("no Linear layers found under blocks/layers: is this a timm ViT/DeiT/Swin model?")
    if cfg.io_bits is not None:
        io_cfg = cfg.with_(w_bits=cfg.io_bits, w_granularity="per_channel", a_bits=cfg.io_bits)
        _quantize_head_(model, io_cfg)
        _quantize_patch_embed_(model, io_cfg)
    elif cfg.head_w_bits is not None:
        _quantize_head_(model, cfg.with_(w_bits=cfg.head_w_bits, w_granularity="per_channel", a_bits=None))
    attn_ids = {id(a) for a in attention_modules(model)}
    for attn_name, attn in [(n, m) for n, m in model.named_modules() if id(m) in attn_ids]:
        attn_cfg = cfg.for_layer(attn_name)
        if attn_cfg.a_bits is not None and attn_cfg.a_scope == "matmul":
            _attach_attn_quantizers(attn, attn_cfg)
    logger.info("prepared %d quantized Linear layers for %s", n, cfg.name)
    return model


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]


def set_quant_enabled_(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every quantizer on or off (off gives the full-precision model with the same weights)."""
    for m in model.modules():
        if isinstance(m, (ActQuantizer, WeightQuantizer)):
            m.enabled = enabled
    return model


class quant_disabled:  # noqa: N801 - used like a function: ``with quant_disabled(model): ...``
    """Context manager running ``model`` in full precision."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.states = [(m, m.enabled) for m in self.model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
        set_quant_enabled_(self.model, False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, state in self.states:
            m.enabled = state


@torch.no_grad()
def calibrate_weights_(model: nn.Module) -> nn.Module:
    """(Re)choose every weight scale from the current weights; call again after weights change (folding)."""
    for _, lin in quant_linears(model):
        if lin.weight_quantizer is not None:
            lin.weight_quantizer.calibrate(lin.weight)
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.weight_quantizer is not None:
            m.weight_quantizer.calibrate(m.weight.flatten(1))
    return model


def _observe(model: nn.Module, named: list[tuple[str, ActQuantizer]], forward_loop: ForwardLoop) -> None:
    """Run ``forward_loop`` with the quantizers ``named`` observing, then choose their scales."""
    for _, q in named:
        q.reset_observer()
        q.observing = True
    try:
        forward_loop(model)
    finally:
        for _, q in named:
            q.observing = False
    for name, q in named:
        try:
            q.finalize()
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}") from exc


def _forward_groups(model: nn.Module, forward_loop: ForwardLoop) -> list[list[tuple[str, ActQuantizer]]]:
    """The activation quantizers in groups, in forward order: one group a transformer block; a quantizer outside
    every block (patch embedding, Swin's patch merging, head) joins the next block's group, or the last one."""
    named = act_quantizers(model)
    order: dict[int, int] = {}

    def record(mod: nn.Module, _args: object) -> None:
        order.setdefault(id(mod), len(order))

    hooks = [q.register_forward_pre_hook(record) for _, q in named]
    try:
        with quant_disabled(model):  # one batch is enough to see the order (a loop may say how: first_batch)
            getattr(forward_loop, "first_batch", forward_loop)(model)
    finally:
        for h in hooks:
            h.remove()
    block_of = {id(m): i for i, b in enumerate(transformer_blocks(model)) for m in b.modules()}
    seen = sorted((order[id(q)], n, q) for n, q in named if id(q) in order)
    groups: list[list[tuple[str, ActQuantizer]]] = []
    pending: list[tuple[str, ActQuantizer]] = []
    current: int | None = None
    for _, n, q in seen:
        block = block_of.get(id(q))
        if block is None:
            pending.append((n, q))
            continue
        if block != current:
            groups.append([])
            current = block
        groups[-1].extend(pending)
        pending = []
        groups[-1].append((n, q))
    if pending and groups:
        groups[-1].extend(pending)
    elif pending:
        groups.append(pending)
    missing = [n for n, q in named if id(q) not in order]
    if missing:
        raise RuntimeError(f"{missing[0]}: activation quantizer saw no data: the forward loop did not reach it")
    return groups


@torch.no_grad()
def calibrate_activations_(model: nn.Module, forward_loop: ForwardLoop, sequential: bool = False) -> nn.Module:
    """Choose every activation scale from the values seen over ``forward_loop``.

    Args:
        model: a prepared model (weights calibrated when ``sequential``).
        forward_loop: runs the calibration data through the model.
        sequential: False observes the full-precision model in one pass. True observes group by group in forward
            order (:func:`_forward_groups`, one group a transformer block), each on the quantized model whose
            earlier groups are already calibrated and on, and whose later groups are off; weights are quantized
            throughout. One pass per group.
    """
    named = act_quantizers(model)
    if not named:
        return model
    was_training = model.training
    model.eval()
    if not sequential:
        with quant_disabled(model):
            _observe(model, named, forward_loop)
    else:
        groups = _forward_groups(model, forward_loop)
        states = [(m, m.enabled) for m in model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
        try:
            for _, q in named:
                q.enabled = False
            for group in groups:
                _observe(model, group, forward_loop)
                for _, q in group:
                    q.enabled = True
        finally:
            for m, state in states:
                m.enabled = state
        logger.info("activation ranges observed sequentially in %d groups", len(groups))
    model.train(was_training)
    return model


def quantize(model: nn.Module, config: QuantConfig, forward_loop: ForwardLoop | None = None) -> nn.Module:
    """Quantize ``model`` in place and return it: insert quantizers, calibrate, enable.

    Args:
        model: a timm ViT/DeiT/Swin in eval mode.
        config: a :class:`~dfq_deploy.config.QuantConfig` (or a preset such as ``W8A8``).
        forward_loop: runs the calibration data through the model; needed when activations are quantized.

    Raises:
        ValueError: activations are quantized but no ``forward_loop`` was given.
    """
    prepare_(model, config)
    calibrate_weights_(model)
    if config.quantizes_activations:
        if forward_loop is None:
            raise ValueError(f"{config.name} quantizes activations: pass a forward_loop with calibration data")
        calibrate_activations_(model, forward_loop, sequential=config.a_calib == "sequential")
    set_quant_enabled_(model, True)
    return model


def batches_loop(images: torch.Tensor, batch_size: int = 32) -> ForwardLoop:
    """A forward loop over an in-memory tensor of images, fed to the model's device in exact float32."""

    def run(model: nn.Module, stop: int) -> None:
        dev = model_device(model)
        with torch.no_grad(), exact_float32():
            for i in range(0, stop, batch_size):
                model(images[i : min(i + batch_size, stop)].to(dev))

    def loop(model: nn.Module) -> None:
        run(model, len(images))

    loop.first_batch = lambda model: run(model, min(batch_size, len(images)))  # type: ignore[attr-defined]
    return loop
