"""A DeepStream ``nvinfer`` classifier config for an exported graph or an engine: ``dfq-deploy serve deepstream``.

Writes ``OUT/config_infer_primary.txt``, ``OUT/labels.txt`` and the model file, all at once
(:func:`~dfq_deploy.utils.atomic_write_dir`; nvinfer resolves the config's relative paths against the config's own
folder). The keys are those of the Gst-nvinfer configuration-file table of DeepStream 7.1
(https://docs.nvidia.com/metropolis/deepstream/7.1/text/DS_plugin_gst-nvinfer.html; the key strings as in
``gstnvinfer_property_parser.h`` of the 7.0 SDK API reference), TensorRT 10.3 on dGPU and on JetPack 6.1:

* ``network-type=1`` (classifier), ``process-mode=1`` (full frames), ``gie-unique-id``, ``gpu-id``, ``batch-size``.
* ``onnx-file`` (nvinfer builds its own engine) or ``model-engine-file`` (an engine from ``dfq-deploy build``).
  nvinfer runs an engine on its optimisation profile 0 only (``FullDimTrtBackendContext`` is created with
  ``DEFAULT_CONTEXT_PROFILE_IDX``), which for ``dfq-deploy build --batch 1,8,32`` is batch 1: ``batch-size`` must
  fit in profile 0, and ``--batch-size`` beyond it is refused (serve the ONNX for larger batches: nvinfer then builds
  min 1, opt = max = batch-size).
* ``network-mode`` from the graph: 1 (INT8) for Q/DQ graphs, 2 (FP16) for FP16-typed graphs (INT4 weight-only
  included), 0 (FP32) otherwise. With ``onnx-file`` nvinfer builds a weakly typed network; for ``network-mode=1``
  without ``int8-calib-file`` its model builder logs "INT8 calibration file not specified. Trying FP16 mode." and sets
  the FP16 flag (``nvdsinfer_model_builder.cpp``); whether TensorRT then runs the Q/DQ layers in INT8 was not
  checked. The engine route runs the graph's own types (strongly typed). Neither was run here.
* ``infer-dims`` (c;h;w), ``model-color-format=0`` (RGB, timm's order), ``maintain-aspect-ratio=0``, and
  ``net-scale-factor``/``offsets`` from the model's mean/std
  (:func:`~dfq_deploy.serve.preprocess.nvinfer_normalization`, ``y = net-scale-factor * (x - offsets)`` on 0-255
  pixels), with a note where one scale cannot express a
  per-channel std. nvinfer scales the whole frame or object to the network size: timm's resize-and-centre-crop is
  not reproduced for frames of another aspect ratio.
* ``labelfile-path``: nvinfer's classifier labels file holds one line per output layer, its classes separated by
  ``;`` (``NvDsInferContextImpl::parseLabelsFile``); models without class names get their class indices.
* ``classifier-threshold``: nvinfer's default classifier parser (``parseAttributesFromSoftmaxLayers``) reads the
  output as probabilities and reports the largest value above the threshold. The exported graphs output logits, so
  the ONNX written here has a ``Softmax`` appended to its output (output ``probs``; the top-1 class is unchanged); an
  engine keeps its logits output, and the config says so.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

import dfq_deploy
from dfq_deploy.errors import DfqError
from dfq_deploy.serve.artifact import ServedModel, load_served_model
from dfq_deploy.serve.preprocess import nvinfer_normalization, preprocess_recipe
from dfq_deploy.serve.target import Target, check_target
from dfq_deploy.trt.profiles import describe_profiles
from dfq_deploy.utils import atomic_write_dir

logger = logging.getLogger(__name__)

CONFIG_FILE = "config_infer_primary.txt"
LABELS_FILE = "labels.txt"
SOFTMAX_OUTPUT = "probs"
DEEPSTREAM_VERSION = "7.1"
#: Every key this module writes, each in the Gst-nvinfer configuration table of DeepStream 7.1 ([property] group).
NVINFER_KEYS = (
    "gpu-id", "gie-unique-id", "process-mode", "network-type", "batch-size", "network-mode", "onnx-file",
    "model-engine-file", "infer-dims", "model-color-format", "net-scale-factor", "offsets", "maintain-aspect-ratio",
    "output-blob-names", "labelfile-path", "classifier-threshold",
)
#: network-mode values (Gst-nvinfer table: 0=FP32, 1=INT8, 2=FP16).
NETWORK_MODES = {"fp32": 0, "int8": 1, "fp16": 2}


@dataclass(frozen=True)
class DeepStreamOptions:
    """How to run the model in nvinfer (``dfq-deploy serve deepstream`` flags).

    Attributes:
        batch_size: nvinfer's ``batch-size`` (default 1 for ONNX, profile 0's largest batch for an engine).
        threshold: ``classifier-threshold`` (0: always report the top class).
        gie_id: ``gie-unique-id``.
        gpu_id: ``gpu-id``.
        target: the pipeline machine's TensorRT and GPU, checked against an engine's build record.
    """

    batch_size: int | None = None
    threshold: float = 0.0
    gie_id: int = 1
    gpu_id: int = 0
    target: Target = field(default_factory=Target)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise DfqError(f"--batch-size {self.batch_size}: must be >= 1")
        if not 0.0 <= self.threshold < 1.0:
            raise DfqError(f"--threshold {self.threshold}: a probability threshold in [0, 1)")
        if self.gie_id < 1 or self.gpu_id < 0:
            raise DfqError(f"--gie-id {self.gie_id} / --gpu-id {self.gpu_id}: need gie-id >= 1 and gpu-id >= 0")


@dataclass(frozen=True)
class DeepStreamConfig:
    """What :func:`write_deepstream_config` wrote: the folder, the config text and what to know about it."""

    out: Path
    config: str
    notes: tuple[str, ...]


def network_mode(model: ServedModel) -> int:
    """nvinfer's ``network-mode`` for the graph's precision (module docstring)."""
    if model.graph_quant == "int8":
        return NETWORK_MODES["int8"]
    return NETWORK_MODES["fp16" if model.graph_dtype == "fp16" else "fp32"]


def with_softmax(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a one-output classifier graph with ``Softmax`` over the last axis appended (output ``probs``)."""
    out = copy.deepcopy(proto)
    graph = out.graph
    if len(graph.output) != 1:
        raise DfqError(f"the graph has {len(graph.output)} outputs: nvinfer's classifier config covers one")
    logits = graph.output[0]
    if logits.name == SOFTMAX_OUTPUT or any(SOFTMAX_OUTPUT in n.output for n in graph.node):
        raise DfqError(f"the graph already has a tensor '{SOFTMAX_OUTPUT}': rename it before serving")
    graph.node.append(helper.make_node("Softmax", [logits.name], [SOFTMAX_OUTPUT], name="dfq_deploy_softmax", axis=-1))
    probs = copy.deepcopy(logits)
    probs.name = SOFTMAX_OUTPUT
    del graph.output[:]
    graph.output.append(probs)
    onnx.checker.check_model(out)
    return out


def _batch_size(model: ServedModel, requested: int | None) -> tuple[int, list[str]]:
    first = model.input.shape[0]
    if model.kind == "onnx":
        size = requested or (first or 1)
        if first is not None and size != first:
            raise DfqError(f"input '{model.input.name}' has a fixed batch of {first}: pass --batch-size {first} or "
                           "re-export with a dynamic batch")
        return size, []
    lo, _, hi = model.profiles[0]
    first_profile = describe_profiles(model.profiles[:1])
    if lo > 1:
        raise DfqError(f"nvinfer runs an engine on its profile 0, which takes {first_profile} in "
                       f"{model.artifact.name}, and sends smaller batches when fewer frames are ready: serve the ONNX "
                       "(nvinfer builds batch 1..N itself), or rebuild with dfq-deploy build --batch 1,...")
    size = requested or hi
    if size > hi:
        raise DfqError(f"--batch-size {size}: nvinfer runs {model.artifact.name} on its profile 0, which takes "
                       f"{first_profile}: pass --batch-size {hi} or less, or serve the ONNX (nvinfer builds batch "
                       "1..N)")
    note = f"nvinfer runs this engine on its profile 0 ({first_profile}); for larger batches serve the ONNX"
    return size, [note] if hi < 8 else []


def _labels(model: ServedModel, classes: int) -> bytes:
    names = list(model.class_names) if model.class_names is not None else [str(i) for i in range(classes)]
    bad = [n for n in names if ";" in n or "\n" in n or "\r" in n or not n.strip()]
    if bad:
        raise DfqError(f"class names {bad[:3]} cannot go in nvinfer's labels file (';'-separated on one line): "
                       "re-export with other names")
    return (";".join(names) + "\n").encode()


def nvinfer_config(model: ServedModel, opts: DeepStreamOptions, model_file: str) -> tuple[str, list[str]]:
    """The ``[property]`` config text for ``model`` (loaded from ``model_file`` beside it) and the notes in it.

    Raises:
        DfqError: not one float32 output of classes, a batch size nvinfer cannot run, or a recipe error
            (:func:`~dfq_deploy.serve.preprocess.preprocess_recipe`).
    """
    recipe = preprocess_recipe(model)
    if len(model.outputs) != 1 or model.outputs[0].dtype != "float32" or len(model.outputs[0].shape) != 2:
        raise DfqError(f"nvinfer's default classifier parser reads one float32 [batch, classes] output, got "
                       f"{[(t.name, t.dtype, list(t.shape)) for t in model.outputs]}")
    batch, notes = _batch_size(model, opts.batch_size)
    norm = nvinfer_normalization(recipe["mean"], recipe["std"])
    c, h, w = recipe["input"]["shape"]
    engine = model.kind == "engine"
    if not norm.exact:
        notes.append("nvinfer has one net-scale-factor for all channels and the model's std is per channel "
                     f"({', '.join(f'{s:g}' for s in recipe['std'])}): the factor uses their midpoint, so each channel "
                     f"is off by {', '.join(f'{100 * e:+.2f}%' for e in norm.relative_error)} after the mean is "
                     "removed (offsets are exact)")
    crop = (f"resizes the shorter side to {recipe['resize']['shorter_side']} and crops the centre {h}x{w}"
            if "shorter_side" in recipe["resize"] else f"resizes to {recipe['resize']['height']}x{w} and crops")
    notes.append(f"nvinfer scales the whole frame (or object) to {h}x{w} while timm {crop}: frames of another aspect "
                 "ratio are seen squashed" + (", and borders timm crops away are kept"
                                              if recipe["resize"].get("shorter_side", h) != h else ""))
    if engine:
        notes.append("this engine outputs logits: nvinfer reports the largest logit above classifier-threshold (and "
                     "above 0) as the confidence; serve the ONNX for probabilities (a Softmax is appended)")
    mode = network_mode(model)
    props = {
        "gpu-id": opts.gpu_id, "gie-unique-id": opts.gie_id, "process-mode": 1, "network-type": 1,
        "batch-size": batch, "network-mode": mode, ("model-engine-file" if engine else "onnx-file"): model_file,
        "infer-dims": f"{c};{h};{w}", "model-color-format": 0,
        "net-scale-factor": f"{norm.net_scale_factor:.12g}",
        "offsets": ";".join(f"{o:.12g}" for o in norm.offsets), "maintain-aspect-ratio": 0,
        "output-blob-names": model.outputs[0].name if engine else SOFTMAX_OUTPUT,
        "labelfile-path": LABELS_FILE, "classifier-threshold": f"{opts.threshold:g}",
    }
    mode_name = {0: "FP32", 1: "INT8", 2: "FP16"}[mode]
    quant = f"{model.graph_quant.upper()} Q/DQ, " if model.graph_quant == "int8" else ""
    lines = [f"# Gst-nvinfer classifier config (DeepStream {DEEPSTREAM_VERSION} keys), written by dfq-deploy "
             f"{dfq_deploy.__version__} from {model.artifact.name}.",
             f"# network-mode={mode} ({mode_name}): the graph is {quant}{model.graph_dtype.upper()}-typed"
             f"{', INT4 weight-only' if model.graph_quant == 'int4' else ''}.",
             "# Normalisation: timm's (x/255 - mean)/std = net-scale-factor * (x - offsets), offsets = 255*mean.",
             *(f"# Note: {n}." for n in notes),
             "[property]",
             *(f"{k}={v}" for k, v in props.items())]
    return "\n".join(lines) + "\n", notes


def write_deepstream_config(out: str | Path, artifacts: Sequence[str | Path], opts: DeepStreamOptions
                            ) -> DeepStreamConfig:
    """Write ``out/`` (nvinfer config, labels, model file) for the model in ``artifacts``; ``out`` must be new.

    Raises:
        DfqError: any bad input, one line naming the fix; nothing is written then.
    """
    out = Path(out)
    if out.exists():
        raise DfqError(f"{out} already exists: choose a new output folder for the DeepStream config")
    model = load_served_model(artifacts)
    notes = check_target(model, opts.target)
    if model.kind == "engine":
        model_file, content = "model.engine", model.artifact
    else:
        model_file, content = "model.onnx", with_softmax(onnx.load(str(model.artifact))).SerializeToString()
    config, config_notes = nvinfer_config(model, opts, model_file)
    files: dict[str, bytes | Path] = {CONFIG_FILE: config.encode(), model_file: content,
                                      LABELS_FILE: _labels(model, int(model.outputs[0].shape[-1] or 0))}
    atomic_write_dir(out, files)
    for note in notes:
        logger.warning("%s", note)
    for note in config_notes:
        logger.info("%s", note)
    return DeepStreamConfig(out, config, (*notes, *config_notes))


def gst_launch_command(config: str | Path) -> str:
    """A ``gst-launch-1.0`` line running the config on DeepStream's sample H.264 stream (primary classifier)."""
    return ("gst-launch-1.0 filesrc location=/opt/nvidia/deepstream/deepstream/samples/streams/sample_720p.h264 ! "
            "h264parse ! nvv4l2decoder ! m.sink_0 nvstreammux name=m batch-size=1 width=1280 height=720 ! "
            f"nvinfer config-file-path={Path(config).resolve()} ! nvvideoconvert ! nvdsosd ! fakesink")
