"""``examples/triton_client.py`` offline: its preprocessing against timm's own transform, and its classification loop
with ONNX Runtime standing in for the server (no Triton server runs here)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from dfq_deploy.data import eval_transform
from dfq_deploy.serve.artifact import Tensor, read_onnx
from dfq_deploy.serve.preprocess import preprocess_recipe
from dfq_deploy.serve.triton import TritonOptions, write_triton_repository

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "triton_client.py"
SIZES = [(32, 32), (40, 50), (97, 31), (300, 200)]


def _client():
    spec = importlib.util.spec_from_file_location("triton_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _recipes(bundled_onnx: Path) -> dict[str, dict]:
    model = read_onnx(bundled_onnx)
    imagenet = dataclasses.replace(
        model, inputs=(Tensor("input", "float32", (None, 3, 224, 224)),),
        data_config={**model.data_config, "input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear"})
    squash = dataclasses.replace(imagenet, data_config={**imagenet.data_config, "crop_mode": "squash",
                                                        "interpolation": "bicubic", "crop_pct": 0.9})
    return {"bundled": preprocess_recipe(model), "imagenet": preprocess_recipe(imagenet),
            "squash": preprocess_recipe(squash)}


def test_preprocess_matches_timms_transform(bundled_onnx: Path) -> None:
    client = _client()
    for name, recipe in _recipes(bundled_onnx).items():
        timm_tf = eval_transform(recipe["timm_data_config"])
        for i, (w, h) in enumerate(SIZES):
            img = _image(w, h, i)
            ours = client.preprocess(img, recipe)
            ref = timm_tf(img).numpy()
            assert ours.shape == ref.shape == tuple(recipe["input"]["shape"]), (name, w, h)
            np.testing.assert_allclose(ours, ref, atol=2e-6, err_msg=f"{name} {w}x{h}")


def test_preprocess_notices_a_wrong_recipe(bundled_onnx: Path) -> None:
    client = _client()
    recipe = _recipes(bundled_onnx)["imagenet"]
    img = _image(300, 200, 0)
    wrong = {**recipe, "resize": {**recipe["resize"], "interpolation": "bicubic"}}  # timm's is bilinear here
    assert not np.allclose(client.preprocess(img, wrong), eval_transform(recipe["timm_data_config"])(img).numpy(),
                           atol=2e-6)
    with pytest.raises(ValueError, match="interpolation"):
        client.preprocess(img, {**recipe, "resize": {**recipe["resize"], "interpolation": "cubic"}})


def test_classify_a_folder_with_onnx_runtime_as_the_server(bundled_onnx: Path, tmp_path: Path) -> None:
    client = _client()
    repo = write_triton_repository(tmp_path / "models", [bundled_onnx], TritonOptions(name="deit"))
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        _image(w, h, i).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    recipe, labels = client.load_recipe(repo.model_dir)
    sess = ort.InferenceSession(str(repo.model_dir / "1" / "model.onnx"))
    calls = []

    def infer(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        return sess.run([recipe["output"]["name"]], {recipe["input"]["name"]: x})[0]

    paths = client.iter_images(tmp_path / "photos")
    results = client.classify(paths, recipe, infer, labels, batch=3)
    assert calls == [3, 1] and [r[0].name for r in results] == ["0.png", "1.png", "2.png", "3.png"]
    timm_tf = eval_transform(recipe["timm_data_config"])
    ref = sess.run(None, {"input": np.stack([timm_tf(Image.open(p).convert("RGB")).numpy() for p in paths])})[0]
    assert [r[1] for r in results] == [labels[k] for k in ref.argmax(-1)]
    assert len(labels) == 10
    assert all(0 < r[2] <= 1 for r in results)


def test_main_names_a_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="preprocess.json not found"):
        _client().main([str(tmp_path), str(tmp_path)])
