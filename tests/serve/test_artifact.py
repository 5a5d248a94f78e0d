"""Reading what is served: an engine's outputs and preprocessing come from the ONNX its build record names (found by
path or beside the engine, checked by sha256), and a record that disagrees with the graph is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.serve.artifact import load_served_model, read_onnx
from dfq_deploy.trt.plan import engine_metadata_path
from tests.serve.conftest import fake_engine, tiny_graph


def test_onnx_reads_io_metadata_and_precision(tmp_path: Path) -> None:
    model = read_onnx(tiny_graph(tmp_path / "model.onnx", "int8", "fp16"))
    assert (model.kind, model.graph_quant, model.graph_dtype) == ("onnx", "int8", "fp16")
    assert [(t.name, t.dtype, t.shape) for t in (*model.inputs, *model.outputs)] == [
        ("input", "float32", (None, 3, 4, 4)), ("logits", "float32", (None, 10))]
    assert model.class_names == tuple(f"c{i}" for i in range(10)) and model.data_config["mean"] == [0.5] * 3


def test_engine_finds_its_graph_by_record_then_beside_it(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "export" / "model.onnx")
    engine = fake_engine(graph, tmp_path / "export" / "model.engine", batch="1,4")
    model = load_served_model([engine])  # the record's absolute path
    assert (model.kind, model.onnx, model.profiles) == ("engine", graph, ((1, 1, 1), (4, 4, 4), (1, 4, 4)))
    assert model.exact_batch_sizes == (1, 4) and model.record["gpu"] == "Orin"
    moved = tmp_path / "copied"
    shutil.copytree(tmp_path / "export", moved)
    shutil.rmtree(tmp_path / "export")
    assert load_served_model([moved / "model.engine"]).onnx == moved / "model.onnx"  # found beside the engine
    (moved / "model.onnx").write_bytes((moved / "model.onnx").read_bytes() + b"\0")  # no longer the built graph
    with pytest.raises(DfqError, match="names no ONNX graph found here"):
        load_served_model([moved / "model.engine"])


def test_a_record_that_disagrees_with_the_graph_is_refused(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "model.onnx")
    engine = fake_engine(graph, tmp_path / "model.engine")
    record = json.loads(engine_metadata_path(engine).read_text())
    record["onnx_sha256"] = None  # an older record: no checksum to match
    for p in record["plan"]["profiles"]:
        p["input_name"] = "pixels"
    engine_metadata_path(engine).write_text(json.dumps(record))
    with pytest.raises(DfqError, match="built for input 'pixels'"):
        load_served_model([engine])
    engine_metadata_path(engine).write_text("{not json")
    with pytest.raises(DfqError, match="not a readable build record"):
        load_served_model([engine])


def test_graphs_without_the_exports_metadata_are_refused(tmp_path: Path) -> None:
    from tests.trt.graphs import save_model

    with pytest.raises(DfqError, match="no preprocessing metadata"):
        read_onnx(save_model(tmp_path, "fp32"))
    with pytest.raises(DfqError, match="expected an .onnx graph or a TensorRT engine"):
        load_served_model([tmp_path / "model.onnx", Path(__file__)])
