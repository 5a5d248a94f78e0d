import pytest
import torch

from dfq_deploy.data import ImageFolder, load_images
from dfq_deploy.errors import DfqError
from tests.conftest import make_image_folder


def test_image_folder_labels_sorted(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2)
    folder = ImageFolder(root)
    assert folder.classes == ["class_0", "class_1", "class_2"]
    assert [label for _, label in folder.samples] == [0, 0, 1, 1, 2, 2]
    sub = folder.subset(4, seed=1)
    assert len(sub) == 4 and sub == folder.subset(4, seed=1)


def test_load_images_normalises(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    root = make_image_folder(tmp_path / "d", classes=2, per_class=2)
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
           "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0, "crop_mode": "center"}
    x, y = load_images(root, cfg)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    # uniform random pixels in [0, 1] normalised with ImageNet statistics
    expected = (0.5 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    assert torch.allclose(x.mean((0, 2, 3)), expected, atol=0.1)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "data folder not found"),
    (lambda p: p.mkdir() or p, "no class sub-folders"),
    (lambda p: (p / "a").mkdir(parents=True) or p, "has no images"),
])
def test_image_folder_errors(tmp_path, make, message):
    with pytest.raises(DfqError, match=message):
        ImageFolder(make(tmp_path / "x"))
