"""A Triton Inference Server model repository for an exported graph or an engine: ``dfq-deploy serve triton``.

Writes ``OUT/NAME/config.pbtxt``, ``OUT/NAME/1/model.plan`` (TensorRT backend) or ``OUT/NAME/1/model.onnx`` (ONNX
Runtime backend), ``OUT/NAME/labels.txt`` when the model has class names and ``OUT/NAME/preprocess.json`` (the
preprocessing a client must do, :func:`~dfq_deploy.serve.preprocess.preprocess_recipe`), all at once
(:func:`~dfq_deploy.utils.atomic_write_dir`). What the config says, and the Triton documents it follows
(``triton-inference-server/server`` ``docs/user_guide/model_configuration.md`` and ``batcher.md``,
``triton-inference-server/common`` ``protobuf/model_config.proto``, ``onnxruntime_backend`` ``README.md`` and
``src/onnxruntime.cc``, ``tensorrt_backend`` ``src/instance_state.cc``; read at their main branches):

* ``platform`` ``tensorrt_plan`` or ``onnxruntime_onnx``, ``default_model_filename`` the file in ``1/``.
* ``max_batch_size`` > 0 with ``dims`` that leave the batch out ("the full shape is formed as [ -1 ] + dims"), so the
  graph's first dimension must be its dynamic batch, on every input and output, or the repository is refused. Names,
  types (``TYPE_FP32`` ... from the datatype table) and dims come from the ONNX graph, for an engine the one it was
  built from (:mod:`dfq_deploy.serve.artifact`).
* An engine: ``max_batch_size`` is its largest profile batch, and the ``instance_group`` lists every optimisation
  profile ("If not specified, the server will select the first optimization profile by default", which for
  ``dfq-deploy build --batch 1,8,32`` is batch 1 only); ``dynamic_batching.preferred_batch_size`` is the batch sizes
  with a profile of their own (above 1), the case batcher.md names ("TensorRT models that specify multiple
  optimization profiles for different batch sizes"). An engine whose profiles leave a batch size up to the maximum
  uncovered is refused: the dynamic batcher forms any size.
* An ONNX graph: ``max_batch_size`` from ``--batch`` (default 1,8,32), ``dynamic_batching { }`` without preferred
  sizes ("should not be used for most models"), and on GPU instances the TensorRT execution accelerator of the ONNX
  Runtime backend with ``precision_mode`` from the graph (INT8 for Q/DQ, FP16 for FP16 graphs), the workspace and
  one ``trt_profile_*_shapes`` range 1..max, so its engine is built once for all batch sizes.
* ``label_filename`` on the output whose last dimension is the class count: one class per line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dfq_deploy
from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.serve.artifact import ServedModel, Tensor, load_served_model
from dfq_deploy.serve.preprocess import preprocess_recipe
from dfq_deploy.serve.target import Target, check_target
from dfq_deploy.trt.plan import DEFAULT_WORKSPACE_MB
from dfq_deploy.trt.profiles import DEFAULT_BATCH_SIZES, describe_profiles, parse_batch_sizes
from dfq_deploy.utils import atomic_write_dir

logger = logging.getLogger(__name__)

#: NumPy-style element type -> Triton's model-config data type (model_configuration.md, "Datatypes").
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
LABELS_FILE = "labels.txt"
PREPROCESS_FILE = "preprocess.json"
#: The NGC image the README's docker line names: release 24.08, for which Triton's compatibility matrix
#: (docs/introduction/compatibility.md, its TensorRT-LLM container's column) lists TensorRT 10.3, the version of
#: JetPack 6.1/6.2; an engine needs the release with its own TensorRT (NVIDIA's Frameworks Support Matrix).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.08-py3"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TritonOptions:
    """How to serve the model (``dfq-deploy serve triton`` flags).

    Attributes:
        name: the model name (its folder in the repository).
        batch: batch sizes of an ONNX graph (default 1,8,32); an engine's come from its profiles.
        instances: model instances per device (``instance_group.count``).
        kind: ``KIND_GPU``, ``KIND_CPU`` (ONNX only) or ``KIND_AUTO``.
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds``.
        trt_accelerator: use ONNX Runtime's TensorRT execution accelerator on GPU instances (ONNX only).
        target: the server's TensorRT and GPU, checked against an engine's build record.
    """

    name: str
    batch: tuple[int, ...] | None = None
    instances: int = 1
    kind: str = "KIND_GPU"
    max_queue_delay_us: int = 0
    trt_accelerator: bool = True
    target: Target = field(default_factory=Target)

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.name or ""):
            raise DfqError(f"--model {self.name!r}: a Triton model name is a folder name of letters, digits, '_', "
                           "'.' and '-', e.g. deit_tiny_w8a8")
        if self.batch is not None:
            object.__setattr__(self, "batch", parse_batch_sizes(self.batch))
        if self.instances < 1:
            raise DfqError(f"--instances {self.instances}: need at least one model instance")
        if self.kind not in INSTANCE_KINDS:
            raise DfqError(f"--kind {self.kind!r}: choose one of {', '.join(INSTANCE_KINDS)}")
        if self.max_queue_delay_us < 0:
            raise DfqError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be >= 0")


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`write_triton_repository` wrote: the model folder, its config and what to know about it."""

    model_dir: Path
    config: str
    notes: tuple[str, ...]


def _quote(text: str) -> str:
    if any(ord(ch) < 32 for ch in text):
        raise DfqError(f"name {text!r} holds control characters, which a Triton config cannot quote: rename it")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_batched(t: Tensor, role: str) -> None:
    if len(t.shape) < 2 or t.shape[0] is not None:
        raise DfqError(f"{role} '{t.name}' has shape {[d if d is not None else 'batch' for d in t.shape]}: Triton "
                       "batches along a dynamic first dimension that every input and output has; re-export the model "
                       "(dfq-deploy export writes a dynamic batch)")
    if role == "input" and any(d is None for d in t.shape[1:]):
        raise DfqError(f"input '{t.name}' has dynamic image dimensions {list(t.shape)}: re-export with a fixed "
                       "image size (only the batch may be dynamic)")


def _covered(profiles: Sequence[tuple[int, int, int]], top: int) -> list[int]:
    """Batch sizes 1..top that no profile contains."""
    return [b for b in range(1, top + 1) if not any(lo <= b <= hi for lo, _, hi in profiles)]


def _batching(model: ServedModel, opts: TritonOptions) -> tuple[int, list[int], tuple[int, int, int]]:
    """``(max_batch_size, preferred sizes, (min, opt, max) of the ORT TensorRT profile)``; see the module docstring."""
    for t in model.inputs:
        _check_batched(t, "input")
    for t in model.outputs:
        _check_batched(t, "output")
    if model.kind == "engine":
        if opts.batch is not None:
            raise DfqError(f"--batch applies to ONNX graphs: {model.artifact.name}'s profiles "
                           f"({describe_profiles(model.profiles)}) set its batch sizes; rebuild it with dfq-deploy "
                           "build --batch to change them")
        top = max(p[2] for p in model.profiles)
        missing = _covered(model.profiles, top)
        if missing:
            raise DfqError(f"{model.artifact.name}'s profiles ({describe_profiles(model.profiles)}) leave batch "
                           f"{missing[0]} uncovered, and Triton's dynamic batcher forms any batch up to {top}: rebuild "
                           "it with dfq-deploy build --batch 1,... and without --no-range-profile")
        return top, [b for b in model.exact_batch_sizes if b > 1], (1, top, top)
    sizes = opts.batch or DEFAULT_BATCH_SIZES
    return sizes[-1], [], (1, sizes[len(sizes) // 2], sizes[-1])  # the range profile build --batch makes


def _accelerator(model: ServedModel, profile: tuple[int, int, int]) -> list[str]:
    """The ONNX Runtime backend's TensorRT execution accelerator block (onnxruntime_backend README)."""
    mode = "INT8" if model.graph_quant == "int8" else "FP16" if model.graph_dtype == "fp16" else "FP32"
    shape = "x".join(str(d) for d in model.input.shape[1:])
    params = [("precision_mode", mode), ("max_workspace_size_bytes", str(DEFAULT_WORKSPACE_MB << 20))]
    params += [(f"trt_profile_{sel}_shapes", f"{model.input.name}:{b}x{shape}")
               for sel, b in zip(("min", "opt", "max"), profile, strict=True)]
    lines = ["# ONNX Runtime's TensorRT execution provider on GPU instances; precision_mode takes one value, "
             f"{mode} from the graph",
             "# (a weakly typed TensorRT build: for the graph's own types everywhere serve a dfq-deploy engine)",
             "optimization { execution_accelerators {", "  gpu_execution_accelerator : [ {",
             '    name : "tensorrt"']
    lines += [f"    parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in params]
    return lines + ["  } ]", "} }"]


def _tensor_block(t: Tensor, labels: bool) -> list[str]:
    dims = ", ".join(str(d) if d is not None else "-1" for d in t.shape[1:])
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {TRITON_TYPES[t.dtype]}", f"    dims: [ {dims} ]"]
    if labels:
        lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
    return lines + ["  }"]


def _listed(field_name: str, blocks: list[list[str]]) -> list[str]:
    """``field [ {...}, {...} ]``, the list syntax of model_configuration.md's examples."""
    lines = [f"{field_name} ["]
    for i, block in enumerate(blocks):
        lines += block[:-1] + [block[-1] + ("," if i < len(blocks) - 1 else "")]
    return lines + ["]"]


def _labelled_output(model: ServedModel) -> str | None:
    """The output the labels belong to: the one whose last dimension is the class count."""
    if model.class_names is None:
        return None
    for t in model.outputs:
        if t.shape and t.shape[-1] == len(model.class_names):
            return t.name
    logger.warning("%d class names but no output with that many classes: no labels file", len(model.class_names))
    return None


def triton_config(model: ServedModel, opts: TritonOptions) -> str:
    """The ``config.pbtxt`` text for ``model`` (protobuf text format of Triton's ``ModelConfig``).

    Raises:
        DfqError: no dynamic batch dimension, an engine profile table with holes, ``--batch`` on an engine, CPU
            instances of an engine, or a type Triton has no name for.
    """
    for t in (*model.inputs, *model.outputs):
        if t.dtype not in TRITON_TYPES:
            raise DfqError(f"tensor '{t.name}' has type {t.dtype}, which Triton's model config cannot express")
    top, preferred, profile = _batching(model, opts)
    plan = model.kind == "engine"
    if plan and opts.kind == "KIND_CPU":
        raise DfqError("a TensorRT engine runs on GPU instances only: drop --kind KIND_CPU, or serve the ONNX")
    labelled = _labelled_output(model)
    source = f"{model.artifact.name}" + (f" (build record {model.artifact.name}.json, outputs from {model.onnx.name})"
                                         if plan else "")
    lines = [f"# Written by dfq-deploy {dfq_deploy.__version__} from {source}.",
             f"# Preprocessing (timm's resize, crop, mean/std): {PREPROCESS_FILE} beside this file.",
             f"name: {_quote(opts.name)}",
             f'platform: "{"tensorrt_plan" if plan else "onnxruntime_onnx"}"',
             f'default_model_filename: "{"model.plan" if plan else "model.onnx"}"',
             f"max_batch_size: {top}"]
    lines += _listed("input", [_tensor_block(t, False) for t in model.inputs])
    lines += _listed("output", [_tensor_block(t, t.name == labelled) for t in model.outputs])
    group = ["  {", f"    count: {opts.instances}", f"    kind: {opts.kind}"]
    if plan:
        group += [f"    # every optimisation profile ({describe_profiles(model.profiles)}); Triton picks one per batch",
                  "    profile: [ " + ", ".join(f'"{i}"' for i in range(len(model.profiles))) + " ]"]
    lines += _listed("instance_group", [group + ["  }"]])
    batcher = ["dynamic_batching {"]
    if preferred:
        batcher.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
    if opts.max_queue_delay_us:
        batcher.append(f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}")
    lines += batcher + ["}"]
    if not plan and opts.trt_accelerator and opts.kind != "KIND_CPU":
        lines += _accelerator(model, profile)
    return "\n".join(lines) + "\n"


def parse_model_config(text: str) -> Any:
    """``text`` parsed into Triton's own ``inference.ModelConfig`` message (tritonclient's ``model_config_pb2``).

    Raises:
        MissingDependencyError: tritonclient (with grpcio) is not installed.
        DfqError: the text does not parse as a ModelConfig.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as exc:  # tritonclient.grpc raises RuntimeError without grpcio
        raise MissingDependencyError("checking a Triton config needs tritonclient and grpcio: pip install "
                                     "'dfq-deploy[serve]'") from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise DfqError(f"the Triton config does not parse as a ModelConfig: {exc}") from exc


def docker_command(repository: str | Path) -> str:
    """The ``docker run`` line of Triton's NGC image serving ``repository`` (HTTP 8000, gRPC 8001, metrics 8002)."""
    return (f"docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {Path(repository).resolve()}:/models "
            f"{TRITON_IMAGE} tritonserver --model-repository=/models")


def _labels(names: Sequence[str]) -> bytes:
    bad = [n for n in names if not n.strip() or "\n" in n or "\r" in n]
    if bad:
        raise DfqError(f"class names {bad[:3]} cannot be lines of a labels file (empty or holding a line break): "
                       "re-export with other names")
    return ("\n".join(names) + "\n").encode()


def write_triton_repository(out: str | Path, artifacts: Sequence[str | Path], opts: TritonOptions) -> TritonRepository:
    """Write ``out/<name>/`` (config, model file, labels, preprocessing) for the model in ``artifacts``.

    ``out`` is the model repository: it may hold other models; ``out/<name>`` must not exist.

    Raises:
        DfqError: any bad input, one line naming the fix; nothing is written then.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DfqError(f"{out} is a file: the model repository must be a folder")
    model_dir = out / opts.name
    if model_dir.exists():
        raise DfqError(f"{model_dir} already exists: choose another --model name, or remove it to replace the model")
    model = load_served_model(artifacts)
    notes = check_target(model, opts.target)
    config = triton_config(model, opts)
    try:
        parsed = parse_model_config(config)
        logger.info("config.pbtxt parses as Triton's ModelConfig (max_batch_size %d)", parsed.max_batch_size)
    except MissingDependencyError as exc:
        logger.info("config.pbtxt not checked against Triton's schema: %s", exc)
    recipe = preprocess_recipe(model)
    files: dict[str, bytes | Path] = {
        "config.pbtxt": config.encode(),
        f"1/{'model.plan' if model.kind == 'engine' else 'model.onnx'}": model.artifact,
        PREPROCESS_FILE: (json.dumps(recipe, indent=2) + "\n").encode(),
    }
    if _labelled_output(model) is not None:
        files[LABELS_FILE] = _labels(model.class_names or ())
    atomic_write_dir(model_dir, files, staging=out.parent)  # staged beside the repository, not inside it
    for note in notes:
        logger.warning("%s", note)
    return TritonRepository(model_dir, config, tuple(notes))
