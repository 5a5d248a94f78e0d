"""Classify a folder of images through a running Triton server that serves a ``dfq-deploy serve triton`` repository.

The preprocessing comes from the ``preprocess.json`` the command wrote beside ``config.pbtxt`` (timm's resize,
centre crop and mean/std of the model), the class names from ``labels.txt``; the model's output is logits, so the
top-1 probability is a softmax computed here. Needs only NumPy, Pillow and ``tritonclient[http]``
(``pip install 'dfq-deploy[serve]'``, or those three on a client machine)::

    dfq-deploy serve triton models --model deit_w8a8 out/w8a8/model.onnx
    docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/models:/models \\
        nvcr.io/nvidia/tritonserver:24.08-py3 tritonserver --model-repository=/models
    python examples/triton_client.py models/deit_w8a8 photos/ --url localhost:8000 --batch 8

It prints one line per image: its path, the top-1 class and its probability. :func:`preprocess` is tested against
timm's own transform (``tests/serve/test_triton_client.py``); the HTTP part has not run against a server here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
RECIPE_FORMAT = "dfq-deploy preprocess 1"


def load_recipe(model_dir: str | Path) -> tuple[dict[str, Any], list[str] | None]:
    """``preprocess.json`` and the class names (``labels.txt``, one per line) of a repository's model folder."""
    model_dir = Path(model_dir)
    path = model_dir / "preprocess.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the model folder that dfq-deploy serve triton wrote (OUT/NAME)")
    recipe = json.loads(path.read_text())
    if recipe.get("format") != RECIPE_FORMAT:
        raise SystemExit(f"{path} is not a '{RECIPE_FORMAT}' recipe: re-run dfq-deploy serve triton")
    labels = model_dir / "labels.txt"
    return recipe, labels.read_text().splitlines() if labels.is_file() else None


def _filter(name: str) -> int:
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
               "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
    if name not in filters:
        raise ValueError(f"interpolation {name!r} is not one of {', '.join(filters)}")
    return filters[name]


def preprocess(image: Image.Image, recipe: dict[str, Any]) -> np.ndarray:
    """One image as the model's input, ``[3, H, W]`` float32: the recipe's resize, centre crop, scale, mean/std.

    The same arithmetic as timm's evaluation transform (torchvision's ``Resize`` on a PIL image, ``CenterCrop``,
    ``ToTensor``, ``Normalize``).
    """
    image = image.convert("RGB")
    resize, crop = recipe["resize"], recipe["crop"]
    w, h = image.size
    if "shorter_side" in resize:
        short = int(resize["shorter_side"])
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        new_w, new_h = int(resize["width"]), int(resize["height"])
    image = image.resize((new_w, new_h), _filter(resize["interpolation"]))
    ch, cw = int(crop["height"]), int(crop["width"])
    if new_w < cw or new_h < ch:
        raise ValueError(f"image resized to {new_w}x{new_h} is smaller than the {cw}x{ch} crop")
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    image = image.crop((left, top, left + cw, top + ch))
    x = np.asarray(image, dtype=np.float32) * np.float32(recipe["scale"])
    x = (x - np.asarray(recipe["mean"], np.float32)) / np.asarray(recipe["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def iter_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder of images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _batches(paths: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classify(paths: Sequence[Path], recipe: dict[str, Any], infer: Callable[[np.ndarray], np.ndarray],
             labels: Sequence[str] | None = None, batch: int = 8) -> list[tuple[Path, str, float]]:
    """``(path, top-1 class, its probability)`` per image; ``infer`` maps a ``[N, 3, H, W]`` batch to logits."""
    results = []
    for chunk in _batches(paths, batch):
        x = np.stack([preprocess(Image.open(p), recipe) for p in chunk])
        probs = softmax(np.asarray(infer(x), dtype=np.float64))
        for p, row in zip(chunk, probs, strict=True):
            k = int(row.argmax())
            results.append((p, labels[k] if labels and k < len(labels) else str(k), float(row[k])))
    return results


def triton_infer(url: str, model: str, recipe: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """An ``infer`` function that sends a batch to ``model`` on the Triton server at ``url`` (HTTP)."""
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise SystemExit("the Triton HTTP client is missing: pip install 'tritonclient[http]'") from None
    client = httpclient.InferenceServerClient(url=url)
    if not client.is_model_ready(model):
        raise SystemExit(f"model '{model}' is not ready on {url}: is tritonserver running with the repository?")
    in_name, out_name = recipe["input"]["name"], recipe["output"]["name"]

    def infer(x: np.ndarray) -> np.ndarray:
        inp = httpclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, inputs=[inp], outputs=[httpclient.InferRequestedOutput(out_name)])
        return result.as_numpy(out_name)

    return infer


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="the repository's model folder (OUT/NAME, holding preprocess.json)")
    ap.add_argument("images", help="a folder of images (searched recursively)")
    ap.add_argument("--url", default="localhost:8000", help="Triton's HTTP endpoint (default localhost:8000)")
    ap.add_argument("--model", help="the model name on the server (default: the folder's name)")
    ap.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    args = ap.parse_args(argv)
    recipe, labels = load_recipe(args.model_dir)
    paths = iter_images(args.images)
    if not paths:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.images}")
    infer = triton_infer(args.url, args.model or Path(args.model_dir).name, recipe)
    for path, label, prob in classify(paths, recipe, infer, labels, args.batch):
        print(f"{path}\t{label}\t{prob:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
