"""``dfq-deploy serve deepstream``: the nvinfer config's keys, its normalisation arithmetic against the model's data
config (and timm's own transform), network-mode per graph precision, labels, the softmax graph and engines."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from dfq_deploy.cli import main
from dfq_deploy.data import eval_transform
from dfq_deploy.errors import DfqError
from dfq_deploy.export.onnx import DATA_CONFIG_KEY
from dfq_deploy.serve.deepstream import (
    CONFIG_FILE,
    NVINFER_KEYS,
    DeepStreamOptions,
    write_deepstream_config,
)
from dfq_deploy.serve.preprocess import nvinfer_normalization
from tests.serve.conftest import fake_engine, tiny_graph

REQUIRED = {"network-type": "1", "process-mode": "1", "model-color-format": "0", "gie-unique-id": "1",
            "labelfile-path": "labels.txt", "maintain-aspect-ratio": "0"}


def _props(out: Path) -> dict[str, str]:
    """The [property] group as nvinfer's GKeyFile reads it ('#' lines are comments)."""
    parser = configparser.ConfigParser(comment_prefixes=("#",), interpolation=None, delimiters=("=",))
    parser.read(out / CONFIG_FILE)
    assert parser.sections() == ["property"]
    return dict(parser["property"])


def _data_config(path: Path) -> dict:
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(meta[DATA_CONFIG_KEY])


def test_bundled_onnx_config(bundled_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    assert main(["serve", "deepstream", str(out), str(bundled_onnx), "--batch-size", "4"]) == 0
    assert f"nvinfer config-file-path={out.resolve() / CONFIG_FILE}" in capsys.readouterr().out
    props = _props(out)
    assert set(props) <= set(NVINFER_KEYS) and REQUIRED.items() <= props.items()
    assert (props["onnx-file"], props["batch-size"], props["network-mode"]) == ("model.onnx", "4", "1")  # INT8 Q/DQ
    assert props["infer-dims"] == "3;32;32" and props["output-blob-names"] == "probs"
    names = json.loads({p.key: p.value for p in onnx.load(str(bundled_onnx)).metadata_props}["dfq_deploy.class_names"])
    assert (out / "labels.txt").read_text().splitlines() == [";".join(names)]  # one line, ';' between classes
    text = (out / CONFIG_FILE).read_text()
    assert "DeepStream 7.1" in text and "one net-scale-factor" in text  # ImageNet std differs per channel


def test_normalisation_arithmetic_matches_the_data_config(bundled_onnx: Path, tmp_path: Path) -> None:
    cfg = _data_config(bundled_onnx)
    write_deepstream_config(tmp_path / "ds", [bundled_onnx], DeepStreamOptions())
    props = _props(tmp_path / "ds")
    scale = float(props["net-scale-factor"])
    offsets = np.array([float(v) for v in props["offsets"].split(";")])
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    np.testing.assert_allclose(offsets, 255 * mean, rtol=1e-10)
    # timm's transform on a 32x32 image (no resize, no crop: crop_pct 1.0) against nvinfer's formula on its pixels
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    timm_y = eval_transform(cfg)(Image.fromarray(pixels)).numpy()
    nv_y = scale * (pixels.transpose(2, 0, 1).astype(np.float64) - offsets[:, None, None])
    err = nvinfer_normalization(mean, std).relative_error
    np.testing.assert_allclose(nv_y, timm_y * (1 + np.array(err))[:, None, None], rtol=1e-5, atol=1e-5)
    assert 0.005 < max(abs(e) for e in err) < 0.012  # ImageNet std (0.229, 0.224, 0.225): about 1.1%
    assert not np.allclose(nv_y, timm_y, atol=1e-3)  # one factor cannot express the per-channel std exactly


def test_equal_std_is_exact(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "model.onnx")  # mean = std = 0.5: y = (x - 127.5) / 127.5
    write_deepstream_config(tmp_path / "ds", [graph], DeepStreamOptions())
    props = _props(tmp_path / "ds")
    assert float(props["net-scale-factor"]) == pytest.approx(1 / 127.5, rel=1e-10)
    assert props["offsets"] == "127.5;127.5;127.5"
    assert "one net-scale-factor" not in (tmp_path / "ds" / CONFIG_FILE).read_text()
    assert nvinfer_normalization([0.5] * 3, [0.5] * 3).exact


@pytest.mark.parametrize("kind, dtype, mode", [("int8", "fp16", "1"), ("int8", None, "1"), ("fp16", None, "2"),
                                               ("fp32", None, "0"), ("int4", "fp16", "2")])
def test_network_mode_from_the_graph_precision(tmp_path: Path, kind: str, dtype: str | None, mode: str) -> None:
    graph = tiny_graph(tmp_path / "model.onnx", kind, dtype)
    write_deepstream_config(tmp_path / "ds", [graph], DeepStreamOptions())
    assert _props(tmp_path / "ds")["network-mode"] == mode


def test_the_served_graph_outputs_probabilities_with_the_same_top1(bundled_onnx: Path, tmp_path: Path) -> None:
    write_deepstream_config(tmp_path / "ds", [bundled_onnx], DeepStreamOptions())
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    logits = ort.InferenceSession(str(bundled_onnx)).run(None, {"input": x})[0]
    sess = ort.InferenceSession(str(tmp_path / "ds" / "model.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["probs"]
    probs = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs.argmax(-1) == logits.argmax(-1)).all()
    assert {p.key for p in onnx.load(str(tmp_path / "ds" / "model.onnx")).metadata_props} >= {DATA_CONFIG_KEY}


def test_engine_runs_on_profile_zero(bundled_onnx: Path, tmp_path: Path, capsys) -> None:
    engine = fake_engine(bundled_onnx, tmp_path / "b" / "model.engine", batch="1,8,32")
    cfg = write_deepstream_config(tmp_path / "ds", [engine], DeepStreamOptions())
    props = _props(tmp_path / "ds")
    assert (props["model-engine-file"], props["batch-size"], props["output-blob-names"]) == (
        "model.engine", "1", "logits")
    assert "onnx-file" not in props and (tmp_path / "ds" / "model.engine").read_bytes() == engine.read_bytes()
    assert any("outputs logits" in n for n in cfg.notes)
    assert main(["serve", "deepstream", str(tmp_path / "ds2"), str(engine), "--batch-size", "8"]) == 2
    assert "profile 0, which takes batch 1" in capsys.readouterr().err
    eight = fake_engine(bundled_onnx, tmp_path / "d" / "model.engine", batch="8")
    with pytest.raises(DfqError, match="sends smaller batches"):
        write_deepstream_config(tmp_path / "ds4", [eight], DeepStreamOptions())


def test_bad_inputs_end_in_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    graph = tiny_graph(tmp_path / "g" / "model.onnx")
    semicolon = tiny_graph(tmp_path / "s" / "model.onnx", class_names=["a;b"] + [f"c{i}" for i in range(9)])
    engine = fake_engine(graph, tmp_path / "e" / "model.engine")
    (tmp_path / "taken").mkdir()
    cases = {
        "exists": ([str(tmp_path / "taken"), str(graph)], "already exists"),
        "semicolon": ([str(tmp_path / "o1"), str(semicolon)], "';'-separated"),
        "threshold": ([str(tmp_path / "o2"), str(graph), "--threshold", "1.5"], "--threshold 1.5"),
        "fixed batch": ([str(tmp_path / "o3"), str(tiny_graph(tmp_path / "f" / "m.onnx", batch=2)),
                         "--batch-size", "4"], "fixed batch of 2"),
        "other TensorRT": ([str(tmp_path / "o4"), str(engine), "--trt-version", "10.0"], "built by TensorRT"),
    }
    for case, (args, message) in cases.items():
        assert main(["serve", "deepstream", *args]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dfq-deploy: error: ") and message in err[-1], (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "f", "g", "s", "taken"]  # no output, no staging
