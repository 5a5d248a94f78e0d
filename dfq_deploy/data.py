"""Image data: ImageFolder directories and zips, preprocessed with the model's timm data config.

Labels: where the model has class names (:func:`dfq_deploy.models.class_names`), each class folder gets the index of
its name, so a folder of some classes (``cat/``, ``dog/``) is scored right; otherwise torchvision's ImageFolder
convention, class folders sorted alphabetically give 0..C-1, and their count must be the model's.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

#: Where the shared CIFAR-10 copy lives relative to the project root (``DFQ_DATA`` overrides it).
DEFAULT_DATA_ROOT = Path(os.environ.get("DFQ_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def default_cifar10(split: str) -> Path:
    """Path of a split of the shared CIFAR-10 copy: ``dev``, ``calib-real`` or ``train.zip``."""
    return (DEFAULT_DATA_ROOT / "cifar10" / split).resolve()


def folder_labels(root: Path, classes: list[str], class_names: Sequence[str] | None,
                  num_classes: int | None) -> list[int]:
    """The model's label of each class folder (see the module docstring).

    Raises:
        DfqError: a folder is not one of the model's class names, or (without names) the folder count is not
            the model's class count.
    """
    if class_names is not None:
        index = {n.lower(): i for i, n in enumerate(class_names)}
        unknown = [c for c in classes if c.lower() not in index]
        if unknown:
            shown = ", ".join(list(class_names)[:10]) + (", ..." if len(class_names) > 10 else "")
            raise DfqError(f"data folder {root}: class folder(s) {', '.join(unknown[:5])} are not classes of the "
                           f"model (its {len(class_names)} classes: {shown}); name each class folder after one")
        return [index[c.lower()] for c in classes]
    if num_classes is not None and len(classes) != num_classes:
        raise DfqError(f"data folder {root} has {len(classes)} class folders but the model has {num_classes} "
                       "classes and no class names to match them by: give it one folder per class, sorted in "
                       "the model's label order")
    return list(range(len(classes)))


class ImageFolder:
    """A list of ``(path, label)`` pairs from ``root/<class>/<image>``.

    Args:
        root: directory with one sub-folder per class.
        class_names: the model's class names in label order; each folder's label is its name's index.
        num_classes: the model's class count, checked against the folder count when there are no names.

    Raises:
        DfqError: the folder is missing, has no class folders, holds no images, or its classes do not match the
            model's (:func:`folder_labels`).
    """

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DfqError(f"data folder not found: {self.root} (pass an ImageFolder directory: DIR/<class>/<img>)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DfqError(f"data folder {self.root} has no class sub-folders (expected DIR/<class>/<image>)")
        self.labels = folder_labels(self.root, self.classes, class_names, num_classes)
        self.samples: list[tuple[Path, int]] = []
        for label, cls in zip(self.labels, self.classes, strict=True):
            files = sorted(p for p in (self.root / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DfqError(
                f"data folder {self.root} has no images ({', '.join(IMAGE_EXTENSIONS[:3])}...) "
                "in its class folders"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, limit: int | None, seed: int = 0) -> list[tuple[Path, int]]:
        """At most ``limit`` samples, drawn without replacement with a fixed seed (all when None)."""
        if limit is None or limit >= len(self.samples):
            return list(self.samples)
        idx = np.random.default_rng(seed).permutation(len(self.samples))[:limit]
        return [self.samples[i] for i in sorted(idx)]


def eval_transform(data_cfg: dict[str, Any]):
    """timm's evaluation transform (resize, centre crop, normalise) for a data config."""
    from timm.data import create_transform

    return create_transform(**data_cfg, is_training=False)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DfqError(f"not a readable image: {path} ({exc.__class__.__name__}); remove it from the folder") from exc


def iter_image_batches(
    root: str | Path,
    data_cfg: dict[str, Any],
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches from an ImageFolder, preprocessed for the model.

    Args:
        root: ImageFolder directory.
        data_cfg: timm data config of the model (see :func:`dfq_deploy.models.data_config`).
        batch_size: images per batch.
        limit: evaluate a seeded random subset of this size.
        seed: seed of the subset.
        class_names: the model's class names (labels by name); see :class:`ImageFolder`.
        num_classes: the model's class count; see :class:`ImageFolder`.
    """
    folder = ImageFolder(root, class_names, num_classes)
    samples = folder.subset(limit, seed)
    tf = eval_transform(data_cfg)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        x = torch.stack([tf(_open_rgb(p)) for p, _ in chunk])
        y = torch.tensor([label for _, label in chunk])
        yield x, y


def load_images(
    root: str | Path, data_cfg: dict[str, Any], limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a (sub)set of an ImageFolder into memory as one preprocessed tensor and its labels."""
    xs, ys = zip(*iter_image_batches(root, data_cfg, 256, limit, seed), strict=True)
    return torch.cat(xs), torch.cat(ys)


def load_zip_imagefolder(zip_path: str | Path, cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a zipped ImageFolder (``<split>/<class>/<img>``) into uint8 ``[N, H, W, 3]`` and labels.

    Decoding 50,000 JPEGs takes about a minute, so the arrays are cached as ``.npz`` when ``cache`` is given.

    Raises:
        DfqError: the zip is missing or holds no images.
    """
    zip_path = Path(zip_path)
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            return z["images"], z["labels"]
    if not zip_path.is_file():
        raise DfqError(f"zip not found: {zip_path} (pass the CIFAR-10 train.zip with --train-zip)")
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not names:
            raise DfqError(f"{zip_path} holds no images")
        classes = sorted({Path(n).parent.name for n in names})
        index = {c: i for i, c in enumerate(classes)}
        names.sort()
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])
        labels = np.array([index[Path(n).parent.name] for n in names], dtype=np.int64)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp.npz")
        np.savez(tmp, images=images, labels=labels, classes=np.array(classes))
        os.replace(tmp, cache)
    logger.info("decoded %d images in %d classes from %s", len(images), len(classes), zip_path)
    return images, labels
