"""``dfq-deploy serve triton``: every config.pbtxt parses with Triton's own ModelConfig schema, names and dims follow
the ONNX graph, and repositories whose model would not load are refused in one line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from dfq_deploy.cli import main
from dfq_deploy.errors import DfqError
from dfq_deploy.export.onnx import CLASS_NAMES_KEY, DATA_CONFIG_KEY
from dfq_deploy.serve.triton import TritonOptions, parse_model_config, write_triton_repository
from tests.serve.conftest import fake_engine, tiny_graph


def _config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """The written config parsed by Triton's schema directly (not through the code under test)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _graph_io(path: Path) -> tuple[list[tuple[str, list]], list[tuple[str, list]], dict[str, str]]:
    proto = onnx.load(str(path))

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    return ([(v.name, dims(v)) for v in proto.graph.input], [(v.name, dims(v)) for v in proto.graph.output],
            {p.key: p.value for p in proto.metadata_props})


def test_bundled_onnx_repository(bundled_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models"
    assert main(["serve", "triton", str(out), "--model", "deit_w8a8", str(bundled_onnx)]) == 0
    assert "docker run --gpus all" in capsys.readouterr().out
    model_dir = out / "deit_w8a8"
    cfg = _config(model_dir)
    inputs, outputs, meta = _graph_io(bundled_onnx)
    assert [(i.name, list(i.dims)) for i in cfg.input] == [(n, d[1:]) for n, d in inputs] == [("input", [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [(n, d[1:]) for n, d in outputs] == [("logits", [10])]
    assert inputs[0][1][0] == outputs[0][1][0] == "batch"  # the batch Triton adds is the graph's symbolic one
    assert cfg.input[0].data_type == cfg.output[0].data_type == model_config_pb2.TYPE_FP32
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("deit_w8a8", "onnxruntime_onnx", 32)
    assert cfg.HasField("dynamic_batching") and list(cfg.dynamic_batching.preferred_batch_size) == []
    group = cfg.instance_group[0]
    assert (group.count, group.kind, list(group.profile)) == (1, model_config_pb2.ModelInstanceGroup.KIND_GPU, [])
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "INT8"  # a Q/DQ graph
    assert (acc.parameters["trt_profile_min_shapes"], acc.parameters["trt_profile_max_shapes"]) == (
        "input:1x3x32x32", "input:32x3x32x32")
    assert (model_dir / "1" / "model.onnx").read_bytes() == bundled_onnx.read_bytes()
    assert cfg.output[0].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == json.loads(meta[CLASS_NAMES_KEY])
    recipe = json.loads((model_dir / "preprocess.json").read_text())
    data_cfg = json.loads(meta[DATA_CONFIG_KEY])
    assert (recipe["mean"], recipe["std"], recipe["timm_data_config"]) == (data_cfg["mean"], data_cfg["std"], data_cfg)
    assert sorted(p.name for p in out.parent.iterdir()) == ["models"]  # no staging folder left beside it


def test_engine_repository_lists_every_profile(bundled_onnx: Path, tmp_path: Path) -> None:
    engine = fake_engine(bundled_onnx, tmp_path / "build" / "model.engine", batch="1,8,32")
    repo = write_triton_repository(tmp_path / "models", [engine], TritonOptions(name="deit_trt", instances=2))
    cfg = _config(repo.model_dir)
    assert (cfg.platform, cfg.default_model_filename, cfg.max_batch_size) == ("tensorrt_plan", "model.plan", 32)
    assert list(cfg.instance_group[0].profile) == ["0", "1", "2", "3"] and cfg.instance_group[0].count == 2
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]  # the exact profiles above batch 1
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [10])]  # from the ONNX the record names
    assert (repo.model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not cfg.optimization.HasField("execution_accelerators")
    assert any("TensorRT 10.3.0.30" in n for n in repo.notes)  # no target given: what the engine needs is said


@pytest.mark.parametrize("kind, dtype, mode", [("int8", "fp16", "INT8"), ("fp16", None, "FP16"),
                                               ("fp32", None, "FP32"), ("int4", "fp16", "FP16")])
def test_accelerator_precision_follows_the_graph(tmp_path: Path, kind: str, dtype: str | None, mode: str) -> None:
    graph = tiny_graph(tmp_path / "model.onnx", kind, dtype)
    repo = write_triton_repository(tmp_path / "models", [graph], TritonOptions(name="m", batch=(1, 4)))
    cfg = _config(repo.model_dir)
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.parameters["precision_mode"] == mode
    assert acc.parameters["trt_profile_opt_shapes"] == "input:4x3x4x4" and cfg.max_batch_size == 4


def test_cpu_instances_and_no_accelerator(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "model.onnx")
    for name, opts in (("cpu", {"kind": "KIND_CPU", "instances": 3}), ("cuda", {"trt_accelerator": False})):
        cfg = _config(write_triton_repository(tmp_path / "models", [graph], TritonOptions(name=name, **opts)).model_dir)
        assert not cfg.optimization.HasField("execution_accelerators")
    assert _config(tmp_path / "models" / "cpu").instance_group[0].count == 3


def test_schema_check_can_fail() -> None:
    with pytest.raises(DfqError, match="does not parse"):
        parse_model_config('name: "m"\nmax_batch_size: "eight"\n')
    with pytest.raises(DfqError, match="does not parse"):
        parse_model_config('name: "m"\nmax_batch_sizes: 8\n')


def test_a_second_model_joins_an_existing_repository(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "model.onnx")
    write_triton_repository(tmp_path / "models", [graph], TritonOptions(name="a"))
    before = (tmp_path / "models" / "a" / "config.pbtxt").read_text()
    write_triton_repository(tmp_path / "models", [graph], TritonOptions(name="b"))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["a", "b"]
    assert (tmp_path / "models" / "a" / "config.pbtxt").read_text() == before


def _bad_cases(tmp: Path, bundled: Path) -> dict[str, tuple[list[str], str]]:
    graph = tiny_graph(tmp / "g" / "model.onnx")
    fixed = tiny_graph(tmp / "fixed" / "model.onnx", batch=1)
    engine = fake_engine(graph, tmp / "e" / "model.engine")
    holes = fake_engine(graph, tmp / "h" / "model.engine", range_profile=False)
    no_record = tmp / "n" / "model.engine"
    no_record.parent.mkdir()
    no_record.write_bytes(b"x")
    other = tiny_graph(tmp / "o" / "model.onnx", kind="fp32")
    (tmp / "repo" / "taken").mkdir(parents=True)
    return {
        "fixed batch": ([str(fixed)], "dynamic first dimension"),
        "other TensorRT": ([str(engine), "--trt-version", "10.8"], "built by TensorRT 10.3.0.30 but the target"),
        "other GPU arch": ([str(engine), "--compute-capability", "9.0"], "compute capability 8.7"),
        "other GPU name": ([str(engine), "--gpu", "H100"], "pass --compute-capability 8.7"),
        "name clash": ([str(graph), "--model", "taken"], "already exists"),
        "bad name": ([str(graph), "--model", "a/b"], "folder name"),
        "profile holes": ([str(holes)], "leave batch 2 uncovered"),
        "cpu engine": ([str(engine), "--kind", "KIND_CPU"], "GPU instances only"),
        "no record": ([str(no_record)], "has no build record"),
        "other onnx": ([str(engine), str(other)], "is not the graph model.engine was built from"),
        "two graphs": ([str(graph), str(other)], "one model per command"),
        "batch on engine": ([str(engine), "--batch", "1,4"], "--batch applies to ONNX graphs"),
        "no instances": ([str(graph), "--instances", "0"], "at least one model instance"),
        "missing": ([str(tmp / "nope.onnx")], "artifact not found"),
    }


def test_bad_inputs_end_in_one_line_and_write_nothing(bundled_onnx: Path, tmp_path: Path, capsys) -> None:
    cases = _bad_cases(tmp_path, bundled_onnx)
    for case, (args, message) in cases.items():
        out = tmp_path / "repo"
        before = sorted(p.name for p in out.iterdir())
        if "--model" not in args:
            args = [*args, "--model", "m"]
        assert main(["serve", "triton", str(out), *args]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dfq-deploy: error: ") and message in err[-1], (case, err)
        assert sorted(p.name for p in out.iterdir()) == before, case
        assert not list(tmp_path.glob(".repo*")), case  # no staging folder left


def test_a_failed_first_model_leaves_no_repository(tmp_path: Path, capsys) -> None:
    fixed = tiny_graph(tmp_path / "model.onnx", batch=1)
    assert main(["serve", "triton", str(tmp_path / "new" / "models"), "--model", "m", str(fixed)]) == 2
    assert not (tmp_path / "new").exists()


def test_gpu_name_differs_at_the_same_compute_capability_warns(tmp_path: Path) -> None:
    engine = fake_engine(tiny_graph(tmp_path / "model.onnx"), tmp_path / "model.engine")
    from dfq_deploy.serve.target import Target

    repo = write_triton_repository(tmp_path / "models", [engine], TritonOptions(
        name="m", target=Target(trt_version="10.3", compute_capability="8.7", gpu="Jetson AGX Orin")))
    assert len(repo.notes) == 1 and "same compute capability 8.7" in repo.notes[0]


def test_the_schema_check_names_the_extra_and_importing_serve_needs_neither(monkeypatch) -> None:
    import subprocess
    import sys

    from dfq_deploy.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if tritonclient were not installed
    with pytest.raises(MissingDependencyError, match=r"dfq-deploy\[serve\]"):
        parse_model_config('name: "m"\n')
    code = ("import sys, dfq_deploy.serve.triton, dfq_deploy.serve.deepstream, dfq_deploy.cli; "
            "print('tensorrt' in sys.modules, 'tritonclient' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"]
