import json

import pytest

from dfq_deploy.config import PRESETS, QuantConfig, preset, preset_for_bits
from dfq_deploy.errors import DfqError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_json(name):
    cfg = PRESETS[name]
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["name"] == name


def test_deployable_flags():
    want = {"FP32", "W8A8", "W4A16", "W3A16", "W2A16", "FP8", "NVFP4"}
    assert {n for n, c in PRESETS.items() if c.deployable} == want
    assert not preset("W8A8").with_(attn_log2=True).deployable
    assert not preset("W8A8").with_(a_grid="asymmetric").deployable
    assert not preset("W8A8").with_(io_bits=8).deployable
    assert preset("W8A8").with_(a_calib="sequential").deployable  # only where ranges are observed changes
    assert preset("W3A16").w_storage_bits == 4 and preset("W8A8").w_storage_bits == 8


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"w_bits": 9}, "w_bits=9"),
        ({"a_bits": 1}, "a_bits=1"),
        ({"w_granularity": "blockwise", "w_bits": 8}, "INT4"),
        ({"block_size": 7}, "block_size"),
        ({"w_range": "magic"}, "w_range"),
        ({"a_scope": "everything"}, "a_scope"),
        ({"a_grid": "unsigned"}, "a_grid 'unsigned' is unknown"),
        ({"a_calib": "later"}, "a_calib 'later' is unknown"),
        ({"io_bits": 1}, "io_bits=1"),
        ({"version": 99}, "version"),
    ],
)
def test_config_validates(changes, match):
    with pytest.raises(DfqError, match=match):
        QuantConfig(**changes)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(DfqError, match="unknown quantization config keys: colour"):
        QuantConfig.from_dict({"colour": "red"})


def test_export_bits():
    assert preset_for_bits(8).name == "W8A8"
    assert preset_for_bits(4).name == "W4A16"
    assert preset_for_bits(3).name == "W3A16"
    assert preset_for_bits(32).w_bits is None
    with pytest.raises(DfqError, match="--bits 5 has no deployable"):
        preset_for_bits(5)
    with pytest.raises(DfqError, match="unknown preset"):
        preset("W9A9")


def test_papers_protocol_presets():
    names = [n for n in PRESETS if n.endswith("-paper")]
    assert names == ["W3A3-paper", "W4A3-paper", "W4A4-paper", "W5A5-paper", "W6A6-paper"]
    cfg = preset("w4a3-PAPER")  # names are case-insensitive
    assert (cfg.w_bits, cfg.a_bits, cfg.a_grid, cfg.attn_log2, cfg.io_bits) == (4, 3, "asymmetric", True, 8)
    assert cfg.with_(a_grid="symmetric", attn_log2=False, io_bits=None, name="W4A3") == PRESETS["W4A3"]


def test_key_dict_leaves_out_later_fields_at_their_defaults():
    cfg = PRESETS["W4A3"]
    later = {"a_grid", "a_calib", "io_bits", "layers", "w_format", "a_format"}
    assert set(cfg.to_dict()) - set(cfg.key_dict()) == later
    changed = cfg.with_(a_calib="sequential").key_dict()
    assert changed["a_calib"] == "sequential" and "a_grid" not in changed
