"""The same build with NVIDIA's own tools: ``trtexec`` and ``polygraphy`` command lines from an EnginePlan (pure).

``dfq-deploy build`` writes these into ``<engine>.json`` (keys ``trtexec``, ``trtexec_time``, ``polygraphy``) and
logs them; ``build --dry-run`` prints them. Flags were read in NVIDIA/TensorRT's sources at the tags v10.0.0,
v10.3.0 (JetPack 6), v11.0 and v11.1, ``samples/common/sampleOptions.cpp`` (trtexec's parser and ``--help``) and
``tools/Polygraphy/polygraphy/tools/args`` (Polygraphy 0.49.13 and 0.49.27):

* Several profiles: trtexec takes ``--profile=N`` followed at once by that profile's ``--minShapes``,
  ``--optShapes`` and ``--maxShapes`` ("Can be specified multiple times to create multiple profiles with contiguous
  index. (ex: --profile=0 --minShapes=<spec> --optShapes=<spec> --maxShapes=<spec> --profile=1 ...)"; the parser
  reads the three shape flags only at the positions right after ``--profile``). Shapes are ``name:1x3x224x224``.
* ``--stronglyTyped`` (10.x; "[Deprecated] ... a no-op" in 11.x, where every network is strongly typed, but still
  accepted); the calibrator route instead gets ``--fp16 --int8 --calib=<cache>`` (10.x only, like the route:
  11.1's trtexec has no ``--calib``), the cache ``build`` wrote.
* ``--memPoolSize=workspace:N``: "If none of suffixes is appended, the default unit is in MiB" (10.3, 11.x; 10.0
  takes MiB only), so a bare number works on all of them. ``--timingCacheFile=<file>`` loads and saves the cache.
  ``--profilingVerbosity=detailed`` as ``build`` sets; ``--skipInference`` stops after the build.
* Timing one batch: ``--loadEngine=<file> --useProfile=N --shapes=name:dims`` (``--useProfile`` picks the inference
  context's profile since 10.0, ``--profile`` being the build flag), ``--useCudaGraph`` (11.x: default, flag a
  no-op).
* Polygraphy builds its own engine from the ONNX and compares it with ONNX Runtime: ``--trt-min-shapes``,
  ``--trt-opt-shapes``, ``--trt-max-shapes`` "once for each profile" (``name:[1,3,224,224]``),
  ``--optimization-profile N`` (the runner otherwise uses profile 0), ``--input-shapes`` for the generated data,
  ``--strongly-typed``, ``--pool-limit workspace:NM`` (``M`` = MiB), ``--load-timing-cache``. Its default tolerances
  (1e-5) are for FP32 ("may be too strict for lower precisions like FP16 or INT8"): the line carries looser ones
  for FP16 and quantized graphs, the bounds the GPU tests hold TensorRT to against ONNX Runtime; a comparison
  fails only where both the absolute and the relative error exceed them.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from dfq_deploy.trt.plan import EnginePlan
from dfq_deploy.trt.profiles import choose_profile

logger = logging.getLogger(__name__)

#: ``(atol, rtol, error statistic)`` for ``polygraphy run --trt --onnxrt`` by what the graph holds; None: Polygraphy's
#: defaults (FP32).
POLYGRAPHY_TOLERANCES: dict[str, tuple[float, float, str] | None] = {
    "fp32": None,
    "fp16": (0.02, 0.02, "elemwise"),
    "quantized": (0.1, 0.05, "median"),  # a flipped quantisation step moves single logits; the median does not
}


def shell_line(args: Sequence[str]) -> str:
    """One copy-pasteable shell line (POSIX quoting)."""
    return shlex.join([str(a) for a in args])


def _trtexec_name(name: str) -> str:
    # "Input names can be wrapped with escaped single quotes (ex: 'Input:0')" (trtexec --help)
    return f"'{name}'" if any(c in name for c in ":,'") else name


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _list(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def trtexec_command(plan: EnginePlan) -> list[str]:
    """``trtexec`` arguments that build the engine ``plan`` describes (profiles, typing, workspace, timing cache)."""
    args = ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={plan.output}"]
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    else:
        args += [f"--{flag.lower()}" for flag in plan.builder_flags]
        if plan.calibrator is not None:
            args.append(f"--calib={plan.calibrator.cache_file}")
    name = _trtexec_name(plan.input_name)
    for i, p in enumerate(plan.profiles):
        args += [f"--profile={i}", f"--minShapes={name}:{_dims(p.min)}", f"--optShapes={name}:{_dims(p.opt)}",
                 f"--maxShapes={name}:{_dims(p.max)}"]
    args.append(f"--memPoolSize=workspace:{plan.workspace_mb}")
    if plan.timing_cache:
        args.append(f"--timingCacheFile={plan.timing_cache}")
    args += ["--profilingVerbosity=detailed", "--skipInference"]
    return args


def trtexec_time_command(plan: EnginePlan, batch: int) -> list[str]:
    """``trtexec`` arguments that time the built engine at ``batch`` on the profile TRTEngine would choose.

    Raises:
        DfqError: no profile of the plan contains ``batch``.
    """
    index = choose_profile(plan.batch_table, batch)
    shape = (int(batch), *plan.image_shape)
    return ["trtexec", f"--loadEngine={plan.output}", f"--useProfile={index}",
            f"--shapes={_trtexec_name(plan.input_name)}:{_dims(shape)}", "--useCudaGraph"]


def _tolerances(plan: EnginePlan) -> tuple[float, float, str] | None:
    if plan.graph_quant != "none" or plan.calibrator is not None:
        return POLYGRAPHY_TOLERANCES["quantized"]
    return POLYGRAPHY_TOLERANCES[plan.graph_dtype]


def polygraphy_command(plan: EnginePlan, batch: int | None = None) -> list[str]:
    """``polygraphy run`` arguments comparing TensorRT with ONNX Runtime on ``plan``'s graph at ``batch``.

    Args:
        plan: the build plan (its profiles, typing, workspace and timing cache are passed on).
        batch: batch of the generated inputs; default the plan's smallest batch size. The run uses the profile
            :func:`~dfq_deploy.trt.profiles.choose_profile` picks for it, as TRTEngine does.

    Raises:
        DfqError: no profile of the plan contains ``batch``.
    """
    batch = int(batch) if batch is not None else min(p.opt[0] for p in plan.profiles)
    index = choose_profile(plan.batch_table, batch)
    name = plan.input_name
    args = ["polygraphy", "run", plan.onnx, "--trt", "--onnxrt"]
    if plan.strongly_typed:
        args.append("--strongly-typed")
    else:
        args += [f"--{flag.lower()}" for flag in plan.builder_flags]
        if plan.calibrator is not None:
            args += ["--calibration-cache", plan.calibrator.cache_file]
    for p in plan.profiles:
        args += ["--trt-min-shapes", f"{name}:{_list(p.min)}", "--trt-opt-shapes", f"{name}:{_list(p.opt)}",
                 "--trt-max-shapes", f"{name}:{_list(p.max)}"]
    args += ["--optimization-profile", str(index), "--input-shapes", f"{name}:{_list((batch, *plan.image_shape))}",
             "--pool-limit", f"workspace:{plan.workspace_mb}M"]
    if plan.timing_cache:
        args += ["--load-timing-cache", plan.timing_cache]
    tol = _tolerances(plan)
    if tol is not None:
        atol, rtol, stat = tol
        args += ["--atol", f"{atol:g}", "--rtol", f"{rtol:g}", "--check-error-stat", stat]
    return args


def nvidia_commands(plan: EnginePlan) -> dict[str, object]:
    """The build record's entries: ``trtexec`` (the build), ``trtexec_time`` (one line per profile's opt batch),
    ``polygraphy`` (the comparison at the smallest of them), as shell lines."""
    batches = sorted({p.opt[0] for p in plan.profiles})
    return {
        "trtexec": shell_line(trtexec_command(plan)),
        "trtexec_time": {str(b): shell_line(trtexec_time_command(plan, b)) for b in batches},
        "polygraphy": shell_line(polygraphy_command(plan)),
    }
