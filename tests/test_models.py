import timm
import torch

from dfq_deploy.models import (
    ALIASES,
    BUNDLED_MODEL,
    BUNDLED_WEIGHTS,
    ModelSpec,
    create_model,
    data_config,
    parse_model_kwargs,
    resolve_name,
)


def test_aliases_resolve_to_timm_models():
    for alias, name in ALIASES.items():
        assert resolve_name(alias) == name and timm.is_model(name)
    assert resolve_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"


def test_parse_model_kwargs_types():
    kw = parse_model_kwargs("img_size=32, patch_size=4,drop_rate=0.1,class_token=false,global_pool=avg")
    assert kw == {"img_size": 32, "patch_size": 4, "drop_rate": 0.1, "class_token": False, "global_pool": "avg"}


def test_data_config_follows_built_model():
    model = create_model(ModelSpec("deit_t", kwargs={"img_size": 32, "patch_size": 4, "depth": 1}, random_weights=True))
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert all(not getattr(m, "fused_attn", False) for m in model.modules())


def test_swin_builds_with_overrides():
    model = create_model(ModelSpec("swin_t", kwargs={"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1),
                                                     "embed_dim": 24, "num_heads": (1, 1, 2, 2)}, random_weights=True))
    assert data_config(model)["input_size"] == (3, 64, 64)


def test_bundled_model_loads_offline_from_the_package():
    assert BUNDLED_WEIGHTS.is_file(), "the trained weights must ship inside the package"
    model = timm.create_model(BUNDLED_MODEL, pretrained=True)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
    assert model.num_classes == 10 and len(model.blocks) == 6 and model.embed_dim == 192
    from safetensors.torch import load_file

    state = load_file(str(BUNDLED_WEIGHTS))
    assert torch.equal(model.head.weight, state["head.weight"].float())
