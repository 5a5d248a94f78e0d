"""Quantization settings: a validated dataclass that round-trips to JSON, and named presets.

A preset name spells what it does: ``W4A16`` is 4-bit weights and unquantized (16-bit) activations.
Deployable presets follow TensorRT's explicit-quantization rules (symmetric, per-channel or blocked weights,
per-tensor INT8 activations); the others exist for research comparisons and are only simulated in PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal, TypeVar

from dfq_deploy.errors import DfqError

CONFIG_VERSION = 1
RangeMethod = Literal["minmax", "percentile", "mse"]
_RANGES = ("minmax", "percentile", "mse")
#: Activation grids: ``symmetric`` (zero point 0, deployable) or ``asymmetric`` (affine, simulation only).
A_GRIDS = ("symmetric", "asymmetric")
#: Number formats of weights and activations: ``int`` (the integer grids, the default), ``fp8`` (FP8 E4M3: per-channel
#: weights, per-tensor activations, scale = amax / 448) or ``nvfp4`` (FP4 E2M1 in blocks of 16 along the input dim with
#: an FP8 E4M3 scale per block and an FP32 global scale). NVIDIA's definitions: TensorRT developer guide, "Working with
#: Quantized Types" / "Quantization Schemes" (10.x, 11.x); Model Optimizer's FP8_DEFAULT_CFG / NVFP4_DEFAULT_CFG.
FORMATS = ("int", "fp8", "nvfp4")
#: Block size of NVFP4 (fixed by the format: TensorRT's FP4 block quantization and Model Optimizer's NVFP4).
NVFP4_BLOCK = 16
#: Where activation ranges are observed: ``float`` (the full-precision model) or ``sequential`` (each block's
#: quantizers on the inputs the quantized model gives them, block by block in forward order).
A_CALIBS = ("float", "sequential")


OptionsT = TypeVar("OptionsT", bound="JsonConfig")


class JsonConfig:
    """Validated frozen settings that round-trip to JSON: ``with_``, ``to_dict``/``from_dict``, ``to_json``."""

    #: How this kind of settings is named in errors.
    what: ClassVar[str] = "settings"

    def with_(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls: type[OptionsT], data: dict[str, Any]) -> OptionsT:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise DfqError(f"unknown {cls.what} keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_json(cls: type[OptionsT], text: str) -> OptionsT:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class QuantConfig(JsonConfig):
    """How a model is quantized.

    Attributes:
        name: preset name (informational).
        w_bits: weight bits (2..8), or None for no weight quantization (FP reference).
        w_granularity: ``per_channel`` (one scale per output channel) or ``blockwise`` (one scale per
            ``block_size`` input elements of each output channel, stored in an INT4 container).
        block_size: input elements per weight block (blockwise only).
        w_range: how weight ranges are chosen per channel/block: ``minmax``, ``percentile`` or ``mse``.
        a_bits: activation bits, or None for unquantized activations (weight-only presets).
        a_scope: ``matmul`` quantizes every matmul input (Linear inputs and the attention matmuls'
            Q, K, softmax output and V); ``linear`` only the inputs of Linear layers.
        a_range: how per-tensor activation ranges are chosen.
        a_percentile: percentile of |x| used when ``a_range`` is ``percentile``.
        a_grid: activation grid, :data:`A_GRIDS`: ``symmetric`` (zero point 0, what TensorRT runs) or
            ``asymmetric`` (an affine grid whose zero point follows the range; simulation only).
        a_calib: where activation ranges are observed, :data:`A_CALIBS`: on the ``float`` model, or
            ``sequential``: block by block on the inputs the quantized model gives each block (RepQ-ViT).
        attn_log2: quantize the softmax output with a log2 quantizer (simulation only).
        io_bits: bits of the patch embedding and the classifier head, weights (per channel) and inputs, as in the
            papers' tables; None keeps both in float (simulation only when set).
        head_w_bits: bits of the classifier head's weights (per output channel, weight-only, simulation only),
            or None to keep the head in float. The deployable weight-only presets keep it in float (FP16 in the
            graph): TensorRT documents weight-only quantization only for INT4 blocked weights, and an INT8
            weight-only Gemm is refused by the linter (rule ``weight-only-int8``).
        w_format: weight number format, :data:`FORMATS`: ``int`` (integer grid of ``w_bits``), ``fp8`` (FP8 E4M3, per
            channel, ``w_bits`` 8) or ``nvfp4`` (FP4 E2M1 blocks of 16 with FP8 block scales and an FP32 global scale,
            ``w_bits`` 4, ``blockwise``, ``block_size`` 16).
        a_format: activation number format, :data:`FORMATS`: ``int``, ``fp8`` (per-tensor FP8 E4M3, ``a_bits`` 8) or
            ``nvfp4`` (dynamic FP4 blocks of 16 along the last dim, FP8 block scales computed at run time, a calibrated
            FP32 global scale; ``a_bits`` 4).
        layers: per-layer overrides (mixed precision): module name or ``fnmatch`` pattern -> a preset name
            (``"W4A16"``; ``"FP16"`` keeps the layer in float) or a dict of field changes to this config
            (``{"w_bits": 3}``). A quantizable unit is a block Linear (``blocks.0.attn.qkv``: its weight and
            input quantizer) or an attention module's matmul group (``blocks.0.attn``: Q, K, softmax output and
            V). Later entries win. None: every layer uses this config (:meth:`for_layer`).
        version: config schema version.
    """

    name: str = "custom"
    w_bits: int | None = 8
    w_granularity: Literal["per_channel", "blockwise"] = "per_channel"
    block_size: int = 128
    w_range: RangeMethod = "mse"
    a_bits: int | None = 8
    a_scope: Literal["matmul", "linear"] = "matmul"
    a_range: RangeMethod = "percentile"
    a_percentile: float = 99.99
    a_grid: str = "symmetric"
    a_calib: str = "float"
    attn_log2: bool = False
    io_bits: int | None = None
    head_w_bits: int | None = None
    layers: dict[str, str | dict[str, Any]] | None = None
    w_format: str = "int"
    a_format: str = "int"
    version: int = CONFIG_VERSION

    what: ClassVar[str] = "quantization config"

    def __post_init__(self) -> None:
        if self.w_bits is not None and not 2 <= self.w_bits <= 8:
            raise DfqError(f"w_bits={self.w_bits} is out of range: use 2..8 or None")
        if self.a_bits is not None and not 2 <= self.a_bits <= 8:
            raise DfqError(f"a_bits={self.a_bits} is out of range: use 2..8 or None")
        if self.io_bits is not None and not 2 <= self.io_bits <= 8:
            raise DfqError(f"io_bits={self.io_bits} is out of range: use 2..8 or None")
        if self.a_grid not in A_GRIDS:
            raise DfqError(f"a_grid '{self.a_grid}' is unknown: use one of {', '.join(A_GRIDS)}")
        if self.a_calib not in A_CALIBS:
            raise DfqError(f"a_calib '{self.a_calib}' is unknown: use one of {', '.join(A_CALIBS)}")
        if self.head_w_bits is not None and not 2 <= self.head_w_bits <= 8:
            raise DfqError(f"head_w_bits={self.head_w_bits} is out of range: use 2..8 or None")
        if self.w_granularity not in ("per_channel", "blockwise"):
            raise DfqError(f"w_granularity '{self.w_granularity}' is unknown: use per_channel or blockwise")
        if self.w_granularity == "blockwise" and (self.w_bits or 8) > 4:
            raise DfqError("blockwise weights are stored as INT4: use w_bits <= 4 or per_channel")
        if self.block_size < 2 or self.block_size % 2:
            raise DfqError(f"block_size={self.block_size} must be an even number >= 2")
        for attr in ("w_range", "a_range"):
            if getattr(self, attr) not in _RANGES:
                raise DfqError(f"{attr} '{getattr(self, attr)}' is unknown: use one of {', '.join(_RANGES)}")
        if self.a_scope not in ("matmul", "linear"):
            raise DfqError(f"a_scope '{self.a_scope}' is unknown: use matmul or linear")
        if not 50.0 < self.a_percentile <= 100.0:
            raise DfqError(f"a_percentile={self.a_percentile} must be in (50, 100]")
        if self.version != CONFIG_VERSION:
            raise DfqError(f"config version {self.version} is not supported (this build reads {CONFIG_VERSION})")
        self._check_formats()
        if self.layers is not None:
            if not isinstance(self.layers, dict):
                raise DfqError("layers must map module names (or patterns) to a preset name or a dict of changes")
            for pattern, value in self.layers.items():
                self._layer_value(pattern, value)  # validates

    def _check_formats(self) -> None:
        for attr, bits in (("w_format", self.w_bits), ("a_format", self.a_bits)):
            fmt = getattr(self, attr)
            if fmt not in FORMATS:
                raise DfqError(f"{attr} '{fmt}' is unknown: use one of {', '.join(FORMATS)}")
            want = {"fp8": 8, "nvfp4": 4}.get(fmt)
            if want is not None and bits is not None and bits != want:
                raise DfqError(f"{attr} {fmt} has {want} bits: set {attr[0]}_bits={want}")
        if self.w_format == "fp8" and self.w_bits is not None and self.w_granularity != "per_channel":
            raise DfqError("fp8 weights are per channel: set w_granularity='per_channel'")
        if self.w_format == "nvfp4" and self.w_bits is not None and (
                self.w_granularity != "blockwise" or self.block_size != NVFP4_BLOCK):
            raise DfqError(f"nvfp4 weights are blocks of {NVFP4_BLOCK}: set w_granularity='blockwise', "
                           f"block_size={NVFP4_BLOCK}")
        if self.a_format != "int" and self.a_bits is not None and (self.a_grid != "symmetric" or self.attn_log2):
            raise DfqError(f"a_format {self.a_format} is symmetric: drop a_grid={self.a_grid} / attn_log2")
        if self.a_format == "nvfp4" and self.a_bits is not None and self.a_scope != "linear":
            raise DfqError("nvfp4 activations quantize Linear inputs only (TensorRT's dynamic FP4 quantization, as "
                           "Model Optimizer places it): set a_scope='linear'")
        if self.a_format == "nvfp4" and self.a_bits is not None and self.a_range == "mse":
            raise DfqError("nvfp4 activations: the global scale comes from the tensor's max (a_range minmax or "
                           "percentile); the block scales are computed at run time")

    def __hash__(self) -> int:  # ``layers`` is a dict: hash the JSON form
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    #: Fields a per-layer override may not change: they are about the whole model.
    _GLOBAL_FIELDS: ClassVar[tuple[str, ...]] = ("name", "io_bits", "head_w_bits", "layers", "version", "a_calib")

    def _layer_value(self, pattern: str, value: str | dict[str, Any]) -> QuantConfig:
        """The config one override gives its layers (validated)."""
        if isinstance(value, str):
            return layer_preset(value)
        if not isinstance(value, dict):
            raise DfqError(f"layers['{pattern}']: {value!r} is neither a preset name nor a dict of changes")
        bad = sorted(set(value) & set(self._GLOBAL_FIELDS))
        if bad:
            raise DfqError(f"layers['{pattern}'] changes {', '.join(bad)}, which apply to the whole model: set them "
                           "on the config itself")
        try:
            return replace(self, layers=None, **value)
        except TypeError as exc:
            raise DfqError(f"layers['{pattern}']: {exc}") from exc

    def for_layer(self, name: str) -> QuantConfig:
        """The config of the module ``name`` (a block Linear, or an attention module for its matmul group): this
        config with the last matching :attr:`layers` override applied, without ``layers``."""
        out = self if self.layers is None else replace(self, layers=None)
        for pattern, value in (self.layers or {}).items():
            if fnmatchcase(name, pattern):
                out = self._layer_value(pattern, value)
        return out

    def _all_layer_configs(self) -> list[QuantConfig]:
        base = self if self.layers is None else replace(self, layers=None)
        return [base] + [self._layer_value(p, v) for p, v in (self.layers or {}).items()]

    @property
    def is_float(self) -> bool:
        """True when no layer is quantized (a float export)."""
        return all(c.w_bits is None and c.a_bits is None for c in self._all_layer_configs())

    @property
    def quantizes_activations(self) -> bool:
        """True when some layer quantizes its activations (calibration images are needed)."""
        return any(c.a_bits is not None for c in self._all_layer_configs())

    #: Fields added after the first release, left out of :meth:`key_dict` while at their defaults (which behave as
    #: before they existed), so that cached results keyed on a config stay valid.
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("a_grid", "a_calib", "io_bits", "layers", "w_format", "a_format")

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the later fields that are at their defaults: what result caches key on."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in self.to_dict().items() if k not in self._LATER_FIELDS or v != defaults[k]}

    @property
    def deployable(self) -> bool:
        """True when TensorRT (and ONNX Runtime) can run this preset as real integer kernels (every layer's)."""
        if self.layers is not None:
            return all(c._deployable_uniform() for c in self._all_layer_configs())
        return self._deployable_uniform()

    @property
    def formats(self) -> set[str]:
        """The number formats some layer uses (weights or activations), e.g. ``{"int"}`` or ``{"fp8"}``."""
        out = set()
        for c in self._all_layer_configs():
            out |= {c.w_format} if c.w_bits is not None else set()
            out |= {c.a_format} if c.a_bits is not None else set()
        return out

    @property
    def runs_in_ort(self) -> bool:
        """True when ONNX Runtime (CPU) can run the exported graph: every format but NVFP4 (ORT 1.32 has no FP4
        kernels; the graph's weight path runs in ``onnx.reference.ReferenceEvaluator``, its dynamic FP4 activation
        quantization only in TensorRT)."""
        return "nvfp4" not in self.formats

    def _deployable_uniform(self) -> bool:
        if self.attn_log2 or self.a_grid != "symmetric" or self.io_bits is not None:
            return False
        if self.w_format != "int" or self.a_format != "int":
            # TensorRT quantizes activations and weights for FP8 and FP4 (both together); weight-only quantization is
            # supported for INT4 only (developer guide 10.11+, "Working with Quantized Types": "TensorRT quantizes
            # activations and weights for INT8, FP8, and FP4. Weight-only quantization is supported for INT4.").
            # So FP8 W8A8 and NVFP4 W4A4 deploy; FP4 weight-only (NVFP4-W4A16) and INT4 weights with FP8 activations
            # (W4A8-FP8) have no documented TensorRT route.
            same = self.w_format == self.a_format and self.w_bits is not None and self.a_bits is not None
            return same and self.head_w_bits is None
        if self.a_bits is None:  # weight-only: 2..4 bits in a blocked INT4 container, the one form TensorRT
            # documents for weight-only quantization (an INT8 weight-only matmul is not: lint's weight-only-int8)
            return self.w_bits is None or (self.w_bits <= 4 and self.w_granularity == "blockwise"
                                           and self.head_w_bits is None)
        return self.a_bits == 8 and self.w_bits == 8

    @property
    def w_storage_bits(self) -> int | None:
        """Bits of the ONNX container of the weights (8 or 4; the widest over the layers)."""
        bits = [c.w_bits for c in self._all_layer_configs() if c.w_bits is not None]
        if not bits:
            return None
        return 8 if max(bits) > 4 else 4



def _wonly(name: str, bits: int) -> QuantConfig:
    return QuantConfig(name=name, w_bits=bits, w_granularity="blockwise", a_bits=None)  # the head stays float


def _sim(name: str, w: int, a: int) -> QuantConfig:
    gran = "per_channel"
    return QuantConfig(name=name, w_bits=w, w_granularity=gran, a_bits=a, a_scope="matmul", a_range="mse")


def _paper(w: int, a: int) -> QuantConfig:
    """The data-free ViT papers' protocol (PSAQ-ViT, SPDFQ Table 2, RepQ-ViT): asymmetric activations, a log2
    softmax, the patch embedding and head at 8 bits."""
    return _sim(f"W{w}A{a}-paper", w, a).with_(a_grid="asymmetric", attn_log2=True, io_bits=8)


#: ``export``'s calibration source: the data-free method that did best in the accuracy benchmark
#: (``experiments/results/accuracy-deit_tiny_cifar10.md``).
DEFAULT_CALIB = "dfqvit"
#: Synthesis iterations ``export`` runs in-process by default: the setting the accuracy benchmark measures.
#: Longer runs: ``dfq-deploy synth --iters K`` and ``export --calib-from``.
DEFAULT_SYNTH_ITERS = 200


#: Named presets. Deployable: FP32, W8A8, W4A16, W3A16, W2A16, FP8 (Ada/Hopper/Thor/Blackwell), NVFP4
#: (Blackwell/Thor). Simulated: W3A3, W4A3, W4A4, W5A5, W6A6, NVFP4-W4A16, W4A8 (4-bit weights with INT8
#: activations: TensorRT has no such kernel for explicit QDQ graphs), and the papers'
#: protocol ``W<w>A<a>-paper`` (:func:`_paper`), whose numbers compare with the papers' tables.
PRESETS: dict[str, QuantConfig] = {
    "FP32": QuantConfig(name="FP32", w_bits=None, a_bits=None),
    "W8A8": QuantConfig(name="W8A8", w_bits=8, a_bits=8, a_scope="matmul"),
    "W4A16": _wonly("W4A16", 4),
    "W3A16": _wonly("W3A16", 3),
    "W2A16": _wonly("W2A16", 2),
    "W3A3": _sim("W3A3", 3, 3),
    "W4A3": _sim("W4A3", 4, 3),
    "W4A4": _sim("W4A4", 4, 4),
    "W5A5": _sim("W5A5", 5, 5),
    "W6A6": _sim("W6A6", 6, 6),
    "W4A8": _sim("W4A8", 4, 8),
    # FP8 (E4M3) W8A8: per-channel weights with scale amax / 448, per-tensor activations on every matmul input (the
    # INT8 places); the softmax output's scale is fixed to 1 / 448 (amax 1), as Model Optimizer exports it. The
    # activation ranges: the 99.99th percentile of |x|, which did at least as well as max and MSE on the FP8 grid on
    # data-free and real calibration (experiments/results/accuracy-deit_tiny_cifar10-fp8range.md).
    "FP8": QuantConfig(name="FP8", w_bits=8, w_format="fp8", w_range="minmax", a_bits=8, a_format="fp8",
                       a_scope="matmul", a_range="percentile"),
    # NVFP4 W4A4: the Linear layers' weights and inputs (Model Optimizer's NVFP4_DEFAULT_CFG quantizes Linear inputs
    # and weights; the attention matmuls stay FP16); weights' block scales from each block's max.
    "NVFP4": QuantConfig(name="NVFP4", w_bits=4, w_format="nvfp4", w_granularity="blockwise", block_size=16,
                         w_range="minmax", a_bits=4, a_format="nvfp4", a_scope="linear", a_range="minmax"),
    # NVFP4 weights only, FP16 activations: simulated (TensorRT documents weight-only quantization for INT4 only).
    "NVFP4-W4A16": QuantConfig(name="NVFP4-W4A16", w_bits=4, w_format="nvfp4", w_granularity="blockwise",
                               block_size=16, w_range="minmax", a_bits=None),
    **{p.name: p for p in (_paper(3, 3), _paper(4, 3), _paper(4, 4), _paper(5, 5), _paper(6, 6))},
}

W8A8, W4A16, W3A16, W2A16 = PRESETS["W8A8"], PRESETS["W4A16"], PRESETS["W3A16"], PRESETS["W2A16"]

#: The model the package bundles (weights inside it) and every command's default ``--model``.
BUNDLED_MODEL = "deit_tiny_cifar10"

#: Compute types of an exported graph: FP16 is what TensorRT should build (it keeps the graph's types), FP32 is for
#: CPU runtimes. Input and output are FP32 either way.
GRAPH_DTYPES = ("fp16", "fp32")

#: ``export``'s parity check: the least fraction of each input set on which ONNX Runtime must agree with
#: PyTorch within rounding (:mod:`dfq_deploy.export.parity`).
PARITY_THRESHOLD = 0.99

#: ``--device`` choices besides ``cuda:N``: ``auto`` is CUDA when torch sees a GPU, else the CPU
#: (:func:`dfq_deploy.device.resolve_device`).
DEVICE_CHOICES = ("auto", "cpu", "cuda")

#: Synthesis compute precisions: ``fp32``, or ``bf16`` autocast for the synthesis forward/backward (ranges,
#: corrections and parity are float32 whatever this says).
SYNTH_PRECISIONS = ("fp32", "bf16")

#: ``export --bits`` -> preset. 16 and 32 are float reference exports.
EXPORT_BITS: dict[int, str] = {8: "W8A8", 4: "W4A16", 3: "W3A16", 32: "FP32", 16: "FP32"}
#: ``export --bits`` names of the float formats -> preset.
EXPORT_FORMATS: dict[str, str] = {"fp8": "FP8", "nvfp4": "NVFP4", "fp4": "NVFP4"}


#: Names a per-layer override may use for a float layer (FP16 in the graph, like the rest of the graph).
FLOAT_LAYER_NAMES = ("FP16", "FP32", "FLOAT")


def layer_preset(name: str) -> QuantConfig:
    """The config a per-layer override's preset name stands for (``FP16``/``FP32``/``float``: unquantized)."""
    if name.upper() in FLOAT_LAYER_NAMES:
        return PRESETS["FP32"].with_(name="FP16")
    return preset(name)


def preset(name: str) -> QuantConfig:
    """Look up a preset by name (case-insensitive)."""
    by_key = {k.upper(): v for k, v in PRESETS.items()}
    if name.upper() not in by_key:
        raise DfqError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return by_key[name.upper()]


def preset_for_bits(bits: int | str) -> QuantConfig:
    """The deployable preset for ``export --bits``.

    Raises:
        DfqError: bit widths without a deployable kernel (for example 5); those belong to the benchmark.
    """
    if isinstance(bits, str):
        if bits.lower() in EXPORT_FORMATS:
            return PRESETS[EXPORT_FORMATS[bits.lower()]]
        if not bits.isdigit():
            raise DfqError(f"--bits {bits} is unknown: use 8, 4, 3, 16, 32, fp8 or nvfp4")
        bits = int(bits)
    if bits not in EXPORT_BITS:
        raise DfqError(
            f"--bits {bits} has no deployable TensorRT kernel: use 8 (W8A8), 4 (W4A16), 3 (W3A16), fp8, nvfp4, "
            "16 or 32; simulated bit widths are in experiments/accuracy.py"
        )
    return PRESETS[EXPORT_BITS[bits]]


#: Closed-form corrections fitted after quantization (:mod:`dfq_deploy.quant.correct`).
CORRECTION_MODES = ("none", "bias", "diag", "full")


@dataclass(frozen=True)
class CorrectionConfig(JsonConfig):
    """What is fitted on the calibration set after the quantizer ranges, and folded into the weights.

    The recipe that ``export`` ships, the accuracy benchmark measures and :func:`dfq_deploy.quantize_` runs:
    [reparameterise] -> quantize -> [reconstruct] -> correct -> fold.

    Attributes:
        mode: the correction of every quantized block Linear: ``none``, ``bias`` (an output bias), ``diag`` (an
            output scale and bias per channel, the default) or ``full`` (a ridge input map, re-quantized, then
            ``diag`` on top).
        reparam: fold per-channel scales of post-LayerNorm activations into LayerNorms and Linears before
            calibration (RepQ-ViT; only with quantized activations).
        shrink: move each layer's output correction towards the identity by the strength that does best on a
            held-out quarter of the calibration images (so that it does not fit a few dozen images too closely).
        reconstruct: block-wise reconstruction by Adam before the correction.
        reconstruct_iters: Adam steps per block.
    """

    mode: str = "diag"
    shrink: bool = False
    reparam: bool = False
    reconstruct: bool = False
    reconstruct_iters: int = 100

    what: ClassVar[str] = "correction config"

    def __post_init__(self) -> None:
        if self.mode not in CORRECTION_MODES:
            raise DfqError(f"--correct {self.mode} is unknown: use one of {', '.join(CORRECTION_MODES)}")
        if self.reconstruct_iters < 1:
            raise DfqError(f"--reconstruct-iters {self.reconstruct_iters}: need at least 1")


@dataclass(frozen=True)
class CalibrationConfig(JsonConfig):
    """Where the calibration images come from.

    Attributes:
        source: a data-free method (``dfqvit``, ``spdfq``, ``psaq``), ``noise`` or ``real``.
        num_samples: calibration images.
        iterations: synthesis iterations for a data-free method (None: the method's own default).
        precision: synthesis compute precision (:data:`SYNTH_PRECISIONS`; None: the method's default, fp32).
        calib_dir: ImageFolder for ``real``.
        calib_from: a saved ``dfq-deploy synth`` folder to calibrate with instead of running ``source``.
    """

    source: str = DEFAULT_CALIB
    num_samples: int = 32
    iterations: int | None = DEFAULT_SYNTH_ITERS
    precision: str | None = None
    calib_dir: str | None = None
    calib_from: str | None = None

    what: ClassVar[str] = "calibration config"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise DfqError(f"--num-samples {self.num_samples}: need at least 1 calibration image")
        if self.iterations is not None and self.iterations < 1:
            raise DfqError(f"--synth-iters {self.iterations}: need at least 1 iteration")
        if self.precision is not None and self.precision not in SYNTH_PRECISIONS:
            raise DfqError(f"--synth-dtype {self.precision} is unknown: use one of {', '.join(SYNTH_PRECISIONS)}")
