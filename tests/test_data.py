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


def test_one_reader_of_saved_calibration_images(tmp_path):
    import numpy as np
    import pytest
    from safetensors.numpy import save_file

    from dfq_deploy.calib_images import calib_images_header, read_calib_images
    from dfq_deploy.errors import DfqError

    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    t = np.eye(3, 10, dtype=np.float32)
    save_file({"images": x, "targets": t}, str(tmp_path / "images.safetensors"))
    assert calib_images_header(tmp_path / "images.safetensors") == (3, (3, 8, 8))
    images, targets = read_calib_images(tmp_path / "images.safetensors")
    assert np.array_equal(images, x) and np.array_equal(targets, t) and images.flags["C_CONTIGUOUS"]
    save_file({"images": x.astype(np.float16)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(DfqError, match="expected float32"):
        read_calib_images(tmp_path / "half.safetensors")
    x[0, 0, 0, 0] = np.nan
    save_file({"images": x}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(DfqError, match="NaN or Inf.*re-run"):
        read_calib_images(tmp_path / "nan.safetensors", fix="re-run it")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DfqError, match="is corrupt, not a readable safetensors"):
        calib_images_header(tmp_path / "junk.safetensors")


def test_labels_follow_the_models_class_names(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for cls in ("dog", "Cat"):  # some classes only, in another order, any case
        (make_image_folder(tmp_path / cls, classes=1, per_class=2) / "class_0").rename(root / cls)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog"]
    folder = ImageFolder(root, class_names=names)
    assert folder.classes == ["Cat", "dog"] and [label for _, label in folder.samples] == [3, 3, 5, 5]
    with pytest.raises(DfqError, match=r"class folder\(s\) dog are not classes of the model") as err:
        ImageFolder(root, class_names=["cat", "horse"])
    assert "\n" not in str(err.value)


def test_without_class_names_the_folder_count_must_be_the_models(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=1)
    assert len(ImageFolder(root, num_classes=2)) == 2
    with pytest.raises(DfqError, match="has 2 class folders but the model has 10 classes") as err:
        ImageFolder(root, num_classes=10)
    assert "\n" not in str(err.value)


def test_the_bundled_model_knows_its_classes():
    from dfq_deploy.models import CIFAR10_CLASSES, ModelSpec, class_names, create_model

    assert class_names(create_model(ModelSpec())) == list(CIFAR10_CLASSES)
    # an ImageNet head: WordNet ids, the folder names of ImageNet's ImageFolder layout
    imagenet = create_model(ModelSpec("deit_t", kwargs={"img_size": 32, "patch_size": 16, "depth": 1},
                                      random_weights=True))
    names = class_names(imagenet)
    assert len(names) == 1000 and names[0] == "n01440764"
    assert class_names(create_model(ModelSpec("deit_t", kwargs={"img_size": 32, "patch_size": 16, "depth": 1,
                                                                 "num_classes": 10}, random_weights=True))) is None
