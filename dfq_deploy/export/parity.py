"""Parity of an exported graph with the PyTorch fake-quant model it came from.

An export passes when both checks below pass; ``report.json`` records the rule, the counts and the worst inputs.

1. **Structure** (exact). The graph must hold the model's quantizers and nothing else: every enabled activation
   quantizer appears as one ``QuantizeLinear -> DequantizeLinear`` pair with its scale and zero point 0, and every
   quantized weight dequantizes (integers x scales, per channel or per block, in the layout its MatMul/Gemm
   reads) to the model's fake-quant weight, to float32 precision (with the scales rounded to FP16 first in an
   FP16 graph). This catches faults below the rounding noise
   of an INT8 graph (a missing Q/DQ pair on a late layer, one wrong channel scale), which no logit comparison can
   tell from rounding.
2. **Logits** (statistical). ONNX Runtime (CPU, graph optimizations off) and PyTorch run the same inputs: the
   calibration images and a few hundred cheap held-back probes (:func:`parity_probes`). Per input ``i``, the
   error is ``e_i = max_c |ort_ic - torch_ic| / S`` with ``S`` the median over all inputs of the reference logits'
   standard deviation across classes. Its tolerance comes from the model itself: the same error between the
   PyTorch model in float32 and the same model in another float precision (the *rounding null*: what changing
   nothing but float rounding does to the logits, activation rounding steps included) on up to
   :data:`NULL_INPUTS` inputs. The other precision is the one whose rounding the graph adds (:data:`NULL_DTYPES`):
   float64 for an FP32 graph (float32 rounding itself), float16 for an FP16 graph. The reference stays the
   float32 model that was calibrated, so the FP16 graph is judged against the model, not against a second copy
   of FP16 rounding; and the null cannot be taken from the graph itself::

       tol = max(NULL_FACTOR * max_i null_i, FLOAT_RTOL)

   An input *disagrees* when ``e_i > tol``; a top-1 flip is explained by rounding when its input does not
   disagree (a flip needs a reference margin below ``2 e_i``), so near-tied inputs cannot fail a correct export.
   The export passes when at most ``1 - threshold`` of the inputs of every set disagree and the median error over
   all inputs together is at most ``max(MEDIAN_FACTOR * median_i null_i, FLOAT_RTOL)``: a systematic fault moves
   every input, rounding only some. The median is pooled because the null is measured on the pooled inputs and
   because a set of a few inputs has no meaningful median: the calibration images themselves set the ranges, so
   their activations sit on quantization-grid edges more often than other inputs' (measured: 2 calibration
   images of a random-weight DeiT with median error 7e-3 where the 258 probes and the null have 1e-6).

False alarms, measured (``experiments/results/parity.json``, ``experiments/parity.py``): on 51 correct exports of
the bundled model and of random-weight DeiT / ViT (avg pool, no class token) / Swin at every deployable preset and
several seeds, FP16 graphs (and the FP32 float graphs of ``--bits 32``), none of 16,320 inputs disagreed (the largest
error was 0.20 of its tolerance, the largest pooled median 0.54 of its bound; the FP32-graph run before FP16
became the default had 0.30 and none refused either), so with 288 inputs and a 1% limit a false alarm needs
at least three inputs beyond ``NULL_FACTOR`` times the largest rounding error of the null.

The reference run uses ONNX Runtime with graph optimizations disabled: ORT's fused integer kernels
(MatMulIntegerToFloat, QLinearMatMul, MatMulNBits) round differently, a property of the kernels, not the export.
FP8 graphs run there too (ORT 1.32 runs FLOAT8E4M3FN Q/DQ on the CPU). NVFP4 graphs, which ORT cannot run, run in
``onnx.reference.ReferenceEvaluator`` (:mod:`dfq_deploy.export.reference`) on :data:`REFERENCE_INPUTS` inputs per
set: the FP4 weight path by ONNX's definition of ``DequantizeLinear``; the dynamic FP4 activation path
(``TRT_FP4DynamicQuantize``) by dfq-deploy's implementation of TensorRT's documented semantics, so the result says
``"runtime": ...simulated`` for such graphs.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from dfq_deploy.device import exact_float32, model_device
from dfq_deploy.errors import DfqError
from dfq_deploy.export.fp16 import graph_dtype
from dfq_deploy.export.onnx import pv_output_quantizer
from dfq_deploy.progress import Progress
from dfq_deploy.quant.qmodel import attention_modules, quant_linears

logger = logging.getLogger(__name__)

#: Held-back probe inputs per export (cheap: mixes of calibration images and noise).
NUM_PROBES = 256
#: Seed offset of the probes, so they never repeat the calibration draw.
PROBE_SEED_OFFSET = 2_000_003
#: Inputs the rounding null is measured on.
NULL_INPUTS = 128
#: Graph dtype -> the precision the PyTorch model is run in for the rounding null.
NULL_DTYPES = {"fp32": torch.float64, "fp16": torch.float16}
#: Graph dtype -> the type its Q/DQ scales are stored in.
SCALE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
#: Tolerance = this many times the largest error of the rounding null.
NULL_FACTOR = 8.0
#: Smallest tolerance, relative to the logit scale (FP32 float and weight-only graphs round only in float32).
FLOAT_RTOL = 1e-4
#: The median error may reach this many times the null's median (a systematic fault moves every input).
MEDIAN_FACTOR = 2.0
#: Worst inputs listed in the report.
WORST = 5
#: Inputs per set an NVFP4 graph is checked on in the (slow, numpy) reference evaluator.
REFERENCE_INPUTS = 16
#: ``runtime`` of a parity result, by graph kind.
RUNTIMES = {"ort": "onnxruntime (cpu, optimizations off)",
            "reference": "onnx.reference.ReferenceEvaluator (FP4 weights: ONNX DequantizeLinear)",
            "reference+trt": "onnx.reference.ReferenceEvaluator; TRT_FP4DynamicQuantize simulated by dfq-deploy"}

RULE = (
    "input i disagrees when max_c |ort - torch| / S > tol, S = median over all inputs of std_c(torch logits), "
    f"tol = max({NULL_FACTOR:g} x max error of the PyTorch model run in float64 (FP32 graph) or float16 (FP16 "
    f"graph) against float32, {FLOAT_RTOL:g}); a top-1 "
    "flip is explained by rounding unless its input disagrees; pass: every set has at most 1 - threshold of its "
    f"inputs disagreeing and the median error over all inputs <= max({MEDIAN_FACTOR:g} x the null's median, "
    f"{FLOAT_RTOL:g}), "
    "and the graph holds exactly the model's quantizers (activation Q/DQ scales, dequantized weights)"
)


def reference_session(model: onnx.ModelProto | str):
    """An ONNX Runtime CPU session with every graph optimization off; for an NVFP4 graph (no FP4 kernels in ORT), a
    :class:`~dfq_deploy.export.reference.ReferenceSession` on ONNX's reference evaluator."""
    from dfq_deploy.export.ort import ort_session
    from dfq_deploy.export.reference import ReferenceSession, has_fp4

    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    if has_fp4(proto):
        return ReferenceSession(proto)
    return ort_session(model, optimize=False)


def runtime_of(proto: onnx.ModelProto) -> str:
    """What parity runs ``proto`` on (:data:`RUNTIMES`)."""
    from dfq_deploy.export.reference import has_fp4, has_trt_ops

    return RUNTIMES["reference+trt" if has_trt_ops(proto) else "reference" if has_fp4(proto) else "ort"]


def run_session(session, images: torch.Tensor | np.ndarray, batch_size: int = 64,
                progress: Progress | None = None) -> np.ndarray:
    """Logits of ``images`` from an ORT session, batch by batch (counted on ``progress``, in images)."""
    name = session.get_inputs()[0].name
    x = images.numpy() if isinstance(images, torch.Tensor) else images
    out = []
    for i in range(0, len(x), batch_size):
        out.append(session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})[0])
        if progress is not None:
            progress.update(len(out[-1]))
    return np.concatenate(out)


def ort_logits(proto: Any, images: torch.Tensor | np.ndarray, threads: int | None = None) -> np.ndarray:
    """Logits of the exported graph in ONNX Runtime, optimizations on (the deployed configuration); INT4
    MatMulNBits at accuracy level 0, so W4A16's activations stay float as on TensorRT."""
    from dfq_deploy.export.ort import FLOAT_ACTIVATIONS, ort_session

    return run_session(ort_session(proto, threads=threads, config=FLOAT_ACTIVATIONS), images, batch_size=250)


@torch.no_grad()
def run_torch(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
              progress: Progress | None = None) -> np.ndarray:
    """``model``'s logits of (CPU) ``images``, run on the model's device in exact float32 (no TF32)."""
    model.eval()
    dev = model_device(model)
    out = []
    with exact_float32():
        for i in range(0, len(images), batch_size):
            out.append(model(images[i : i + batch_size].to(dev)).cpu())
            if progress is not None:
                progress.update(len(out[-1]))
    return torch.cat(out).numpy()


def parity_probes(calib: torch.Tensor, n: int = NUM_PROBES, seed: int = 0) -> torch.Tensor:
    """``n`` cheap held-back inputs around the calibration set: mixes of two calibration images (random weight,
    random horizontal flip, plus 0.1 noise) for the first half, Gaussian noise of random scale for the rest.

    Deterministic in ``seed``; never equal to a calibration image.
    """
    g = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
    n_mix = n // 2
    a, b = (torch.randint(0, len(calib), (n_mix,), generator=g) for _ in range(2))
    lam = torch.rand(n_mix, 1, 1, 1, generator=g)
    mix = lam * calib[a] + (1 - lam) * calib[b]
    flip = torch.rand(n_mix, generator=g) < 0.5
    mix[flip] = mix[flip].flip(-1)
    mix = mix + 0.1 * torch.randn(mix.shape, generator=g)
    scale = 0.5 + 1.5 * torch.rand(n - n_mix, 1, 1, 1, generator=g)
    noise = scale * torch.randn((n - n_mix, *calib.shape[1:]), generator=g)
    return torch.cat([mix, noise])


def compare_logits(ref: np.ndarray, out: np.ndarray, tol: float | None = None,
                   scale: float | None = None) -> dict[str, Any]:
    """Agreement figures of two ``[N, C]`` logit arrays; with ``tol``, per-input disagreement under :data:`RULE`.

    Args:
        ref: reference logits (PyTorch).
        out: logits to check (ONNX Runtime).
        tol: disagreement tolerance relative to the logit scale; None for the plain figures only.
        scale: the logit scale ``S``; default: the median std of ``ref``'s logits.
    """
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(ref - out)
    flips = ref.argmax(-1) != out.argmax(-1)
    res: dict[str, Any] = {
        "n": int(len(ref)),
        "top1_agreement": float(np.mean(~flips)),
        "flips": int(flips.sum()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": _logit_scale(ref) if scale is None else float(scale),
    }
    if tol is not None:
        err = diff.max(-1) / res["logit_scale"]
        bad = err > tol
        top2 = np.sort(ref, -1)[:, -2:] if ref.shape[-1] > 1 else np.concatenate([ref, ref], -1)
        margin = (top2[:, 1] - top2[:, 0]) / res["logit_scale"]
        res.update(
            disagreeing=int(bad.sum()), disagreeing_fraction=float(bad.mean()),
            unexplained_flips=int((flips & bad).sum()), median_error=float(np.median(err)),
            max_error=float(err.max()),
            worst=[{"index": int(i), "error": float(err[i]), "margin": float(margin[i]), "flip": bool(flips[i]),
                    "torch_top1": int(ref[i].argmax()), "ort_top1": int(out[i].argmax())}
                   for i in np.argsort(-err)[:WORST]],
        )
    return res


def _logit_scale(ref: np.ndarray) -> float:
    return float(max(np.median(ref.std(-1)), 1e-12))


@torch.no_grad()
def rounding_null(model: nn.Module, images: torch.Tensor, ref: np.ndarray, scale: float | None = None,
                  dtype: torch.dtype = torch.float64, progress: Progress | None = None) -> dict[str, Any]:
    """Per-input relative logit error between ``model`` in float32 (``ref``) and a copy of it in ``dtype``.

    Args:
        model: the float32 model ``ref`` came from.
        images: its inputs.
        ref: ``model``'s logits of ``images``.
        scale: the logit scale the errors are relative to (default: the median std of ``ref``'s logits).
        dtype: the other precision (see :data:`NULL_DTYPES`). In float16 the copy holds the graph's dequantized
            weights (integers times FP16 scales) instead of re-quantizing FP16 weights, whose integers would flip
            on grid edges where the graph's cannot.
        progress: counts the images run.
    """
    other = copy.deepcopy(model)
    if dtype == torch.float16:  # the integer weights are fixed in the graph: only the arithmetic runs in FP16
        for _, lin in quant_linears(other):
            if lin.weight_quantizer is not None and lin.weight_quantizer.enabled:
                lin.weight.data = torch.from_numpy(_dequantized_weight(lin, np.float16)).to(lin.weight.device)
                lin.weight_quantizer.enabled = False
    got = run_torch(other.to(dtype), images.to(dtype), progress=progress).astype(np.float64)
    err = np.abs(got - ref.astype(np.float64)).max(-1) / (_logit_scale(ref) if scale is None else scale)
    return {"n": int(len(images)), "dtype": str(dtype).removeprefix("torch."), "median": float(np.median(err)),
            "max": float(err.max())}


def structure_parity(model: nn.Module, proto: onnx.ModelProto) -> dict[str, Any]:
    """Check that ``proto`` holds exactly ``model``'s enabled quantizers (see the module docstring).

    The model's scales are compared after rounding to the type the graph stores them in (FP16 or FP32).

    Returns:
        ``{"activation_qdq": {"graph": n, "model": m}, "weights": {...}, "problems": [one line each]}``.
    """
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_scales = {t.name: t.data_type for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[str] = []

    # activations: model scales vs graph Q -> DQ pairs
    sdtype = SCALE_DTYPES[graph_dtype(proto)]
    # an NVFP4 quantizer's global scale stays FP32 in either graph (as Model Optimizer's)
    want = Counter(float(np.float32(q.scale.item()) if q.fmt == "nvfp4" else sdtype(q.scale.item()))
                   for q in _enabled_act_quantizers(model))
    got: Counter[float] = Counter()
    dq_scales = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"}
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits or dq.output[0] in dq_scales:
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "TRT_FP4DynamicQuantize":  # NVFP4: one entry, its global scale
            g = inits.get(q.input[1])
            if g is None or g.size != 1:
                problems.append(f"{q.name}: the global scale is not a constant scalar")
            else:
                got[float(g.reshape(()))] += 1
            continue
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{dq.name}: an activation DequantizeLinear without its QuantizeLinear")
            continue
        zps = [inits.get(n.input[2]) if len(n.input) > 2 else np.zeros(()) for n in (q, dq)]
        if any(z is None or np.any(z != 0) for z in zps):
            problems.append(f"{q.name}: zero point is not 0")
        sq, sdq = inits.get(q.input[1]), inits.get(dq.input[1])
        if sq is None or sdq is None or sq.size != 1 or not np.array_equal(sq, sdq):
            problems.append(f"{q.name}: Q and DQ scales differ or are not per-tensor constants")
            continue
        got[float(sq.reshape(()))] += 1
    n_model, n_graph = sum(want.values()), sum(got.values())
    if want != got:
        missing, extra = sum((want - got).values()), sum((got - want).values())
        problems.append(f"activation Q/DQ pairs: the model quantizes {n_model}, the graph holds {n_graph} "
                        f"({missing} of the model's scales missing, {extra} not in the model)")

    # weights: model fake-quant weights [out, in] vs dequantized graph weights in the layout their consumer reads;
    # a weight read by an FP32 island of an FP16 graph keeps its FP32 scale there (export.islands)
    model_w = [(name, _dequantized_weight(lin, sdtype)) for name, lin in quant_linears(model)
               if lin.weight_quantizer is not None and lin.weight_quantizer.enabled]
    exact_w = {name: _dequantized_weight(lin, np.float32) for name, lin in quant_linears(model)
               if lin.weight_quantizer is not None and lin.weight_quantizer.enabled}
    unmatched = list(model_w)
    n_wdq = 0
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.output[0] in dq_scales:
            continue
        n_wdq += 1
        deq = _dequantize(dq, inits, producers)
        out = dq.output[0]
        users = consumers.get(out, [])
        # into an FP32 island (export.islands), or out of NVFP4's FP32 nodes; NVFP4 weights are [out, in] + Transpose
        while len(users) == 1 and users[0].op_type in ("Cast", "Transpose"):
            if users[0].op_type == "Transpose" and deq is not None:
                deq = deq.T
            out = users[0].output[0]
            users = consumers.get(out, [])
        if deq is None or len(users) != 1 or users[0].op_type not in ("MatMul", "Gemm"):
            problems.append(f"{dq.name}: weight DequantizeLinear is not read by exactly one MatMul/Gemm")
            continue
        w = _as_out_in(deq, users[0], out)
        fp32_scale = graph_scales.get(dq.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
        hit = next((k for k, (name, ref) in enumerate(unmatched)
                    if _same_weight(w, exact_w[name] if fp32_scale else ref)), None)
        if hit is None:
            problems.append(f"{dq.name}: dequantizes to a weight that no quantized layer of the model has")
        else:
            unmatched.pop(hit)
    if unmatched:
        problems.append(f"{len(unmatched)} quantized layer(s) have no matching weight in the graph "
                        f"(first: {unmatched[0][0]})")
    return {"activation_qdq": {"graph": n_graph, "model": n_model},
            "weights": {"graph": n_wdq, "model": len(model_w)}, "problems": problems}


def _enabled_act_quantizers(model: nn.Module) -> list[Any]:
    """One entry per Q/DQ pair the graph must hold (the ``proj`` input's twice where the P·V output has it)."""
    qs = [lin.input_quantizer for _, lin in quant_linears(model)]
    for attn in attention_modules(model):
        qs += [getattr(attn, k, None) for k in ("q_quant", "k_quant", "p_quant", "v_quant")]
        qs.append(pv_output_quantizer(attn))
    return [q for q in qs if q is not None and q.enabled]


@torch.no_grad()
def _dequantized_weight(lin: nn.Module, scale_dtype: type) -> np.ndarray:
    """The model's integer weight times its scales rounded to ``scale_dtype``, in float32 ``[out, in]``."""
    wq, w = lin.weight_quantizer, lin.weight.detach().float()
    scale = torch.from_numpy(wq.full_scale(w).cpu().numpy().astype(scale_dtype).astype(np.float32))
    return (wq._grouped(wq.integers(w)).cpu() * scale).reshape(w.shape).numpy()


def _dequantize(dq: onnx.NodeProto, inits: dict[str, np.ndarray],
                producers: dict[str, onnx.NodeProto] | None = None) -> np.ndarray | None:
    """``integers x scale`` of a constant DequantizeLinear (per-tensor, per-axis or blocked; the scale itself
    dequantized from constants for NVFP4's two levels), or None."""
    ints, scale = inits[dq.input[0]].astype(np.float32), inits.get(dq.input[1])
    sp = (producers or {}).get(dq.input[1])
    if scale is None and sp is not None and sp.op_type == "DequantizeLinear" and sp.input[0] in inits:
        scale = _dequantize_any(sp, inits)
    if scale is None or ints.ndim != 2:
        return None
    zp = inits.get(dq.input[2]) if len(dq.input) > 2 else None
    if zp is not None and np.any(zp != 0):
        return None
    attrs = {a.name: a.i for a in dq.attribute}
    axis, block = attrs.get("axis", 1) % 2, attrs.get("block_size", 0)
    scale = scale.astype(np.float32)
    if scale.ndim == 0:
        return ints * scale
    if block:
        if scale.shape[axis] * block != ints.shape[axis]:
            return None
        return ints * np.repeat(scale, block, axis=axis)
    if scale.shape != (ints.shape[axis],):
        return None
    return ints * (scale[None, :] if axis == 1 else scale[:, None])


def _dequantize_any(dq: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    """A constant per-tensor DequantizeLinear's output (NVFP4: FP8 block scales x the FP32 global scale)."""
    scale = inits.get(dq.input[1])
    if scale is None or scale.size != 1:
        return None
    return inits[dq.input[0]].astype(np.float32) * scale.astype(np.float32).reshape(())


def _same_weight(w: np.ndarray, ref: np.ndarray) -> bool:
    return ref.shape == w.shape and np.allclose(w, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())


def _as_out_in(w: np.ndarray, user: onnx.NodeProto, name: str) -> np.ndarray:
    """A MatMul/Gemm constant weight in ``[out, in]`` layout, as ``nn.Linear`` holds it."""
    if user.op_type == "MatMul":
        return w.T if user.input[1] == name else w
    attrs = {a.name: a.i for a in user.attribute}
    trans = attrs.get("transB", 0) if user.input[1] == name else 1 - attrs.get("transA", 0)
    return w if trans else w.T


def measure_parity(
    model: nn.Module, proto: onnx.ModelProto, inputs: dict[str, torch.Tensor], threshold: float = 0.99,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare ``model`` (PyTorch) and ``proto`` (ORT) on named input sets under :data:`RULE`.

    Args:
        model: the fake-quant model that was exported.
        proto: the exported graph.
        inputs: e.g. ``{"calibration": x_cal, "held_back": parity_probes(x_cal)}``.
        threshold: minimum fraction of inputs of every set that must agree within rounding (0 turns the check off).
        progress: a progress bar on a terminal (log lines with an ETA are written either way).

    Returns:
        ``{set name: figures, ..., "rule", "threshold", "tolerance", "null", "structure", "checks", "passed"}``.
    """
    session = reference_session(proto)
    runtime = runtime_of(proto)
    if runtime != RUNTIMES["ort"]:  # the reference evaluator is slow: a few inputs per set, spread over each set
        inputs = {k: x[torch.linspace(0, len(x) - 1, min(len(x), REFERENCE_INPUTS)).round().long()]
                  for k, x in inputs.items()}
    dtype = graph_dtype(proto)
    n_all = sum(len(x) for x in inputs.values())
    n_null = min(NULL_INPUTS, n_all)
    # every input through PyTorch and ONNX Runtime, plus the rounding null's inputs through the other precision
    prog = Progress(2 * n_all + n_null, "parity", "img", logger, bar=progress)
    refs = {name: run_torch(model, x, progress=prog) for name, x in inputs.items()}
    all_x = torch.cat(list(inputs.values()))
    pick = torch.linspace(0, len(all_x) - 1, n_null).round().long()
    all_ref = np.concatenate(list(refs.values()))
    scale = _logit_scale(all_ref)
    null = rounding_null(model, all_x[pick], all_ref[pick.numpy()], scale, NULL_DTYPES[dtype], progress=prog)
    tol = max(NULL_FACTOR * null["max"], FLOAT_RTOL)
    out: dict[str, Any] = {}
    errors = []
    for name, x in inputs.items():
        got = run_session(session, x, progress=prog)
        out[name] = compare_logits(refs[name], got, tol, scale)
        errors.append(np.abs(refs[name].astype(np.float64) - got).max(-1) / scale)
        logger.info("parity on %s: %d of %d inputs beyond rounding (median error %.3g, tolerance %.3g)", name,
                    out[name]["disagreeing"], out[name]["n"], out[name]["median_error"], tol)
    prog.close()
    sets = list(out.values())
    pooled = float(np.median(np.concatenate(errors)))
    structure = structure_parity(model, proto)
    out.update(rule=RULE, runtime=runtime, graph_dtype=dtype, threshold=threshold, tolerance=tol, null=null,
               structure=structure,
               median_error=pooled, median_bound=_median_bound(null))
    numeric_ok = (all(v["disagreeing_fraction"] <= 1 - threshold for v in sets)
                  and pooled <= _median_bound(null))
    out["checks"] = {"logits": numeric_ok, "structure": not structure["problems"]}
    out["passed"] = threshold == 0 or all(out["checks"].values())
    return out


def _median_bound(null: dict[str, float]) -> float:
    return max(MEDIAN_FACTOR * null["median"], FLOAT_RTOL)


def parity_sets(parity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-input-set figures of a :func:`measure_parity` result (``calibration``, ``held_back``, ...)."""
    return {k: v for k, v in parity.items() if isinstance(v, dict) and "disagreeing" in v}


def require_parity(parity: dict[str, Any]) -> None:
    """Raise a one-line :class:`DfqError` when the export's parity check failed."""
    if parity["passed"]:
        return
    tail = "the export is wrong; nothing was written (--parity-threshold 0 skips the check, to debug only)"
    problems = parity["structure"]["problems"]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DfqError(f"the ONNX graph does not hold the model's quantizers: {problems[0]}{more}: {tail}")
    name, worst = max(parity_sets(parity).items(),
                      key=lambda kv: (kv[1]["disagreeing_fraction"], kv[1]["median_error"]))
    if worst["disagreeing_fraction"] <= 1 - parity["threshold"]:
        raise DfqError(
            f"ONNX Runtime's logits differ from the PyTorch model's systematically: median error "
            f"{parity['median_error']:.3g} x logit scale over all inputs, rounding explains at most "
            f"{parity['median_bound']:.3g}: {tail}"
        )
    raise DfqError(
        f"ONNX Runtime's logits differ from the PyTorch model's beyond rounding on {worst['disagreeing']} of "
        f"{worst['n']} {name} inputs (median error {worst['median_error']:.3g}, tolerance {parity['tolerance']:.3g} "
        f"x logit scale, limit {100 * (1 - parity['threshold']):.1f}% of inputs): {tail}"
    )
