"""Profiles per batch size and the choice of profile per call, on recorded profile tables (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.build import engine_metadata
from dfq_deploy.trt.context import TensorInfo
from dfq_deploy.trt.feed import check_feed, profile_table
from dfq_deploy.trt.plan import EnginePlan
from dfq_deploy.trt.planner import plan_build
from dfq_deploy.trt.profiles import batch_envelope, batch_profiles, choose_profile, describe_profiles
from tests.trt.graphs import CHW, save_model

#: The ``model.engine.json`` of an engine built before per-batch profiles (its keys as build.py wrote them then).
OLD_RECORD = {
    "engine": "out/w8a8/model.engine", "tensorrt_version": "10.3.0.30", "gpu": "Orin", "precision": "int8",
    "profile": {"input_name": "input", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]},
    "plan": {"onnx": "out/w8a8/model.onnx", "output": "out/w8a8/model.engine", "precision": "int8",
             "strongly_typed": True, "builder_flags": [], "workspace_mb": 1024,
             "profile": {"input_name": "input", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224],
                         "max": [32, 3, 224, 224]},
             "timing_cache": None, "calibrator": None, "min_trt_version": "10.0", "max_trt_major": None,
             "graph_quant": "int8", "graph_dtype": "fp16", "notes": []},
}


def _recorded(meta: dict) -> list[tuple[int, int, int]]:
    """The profile table of a build record, by profile index (new records: ``profiles``; old: the plan's one)."""
    return EnginePlan.from_dict(meta["plan"]).batch_table


def test_batch_profiles_are_exact_then_the_range() -> None:
    assert batch_profiles((1, 8, 32)) == [(1, 1, 1), (8, 8, 8), (32, 32, 32), (1, 8, 32)]
    assert batch_profiles("32,1") == [(1, 1, 1), (32, 32, 32), (1, 32, 32)]
    assert batch_profiles((1, 2, 4, 8)) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (1, 4, 8)]
    assert batch_profiles((8,)) == [(8, 8, 8)]  # one size: nothing to range over
    assert batch_profiles((1, 8, 32), range_profile=False) == [(1, 1, 1), (8, 8, 8), (32, 32, 32)]


def test_each_batch_runs_on_the_profile_tuned_for_it(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8")
    meta = json.loads(json.dumps(engine_metadata(plan, "10.3.0.30", {"name": "Orin"}, 1.0)))  # as read from disk
    table = _recorded(meta)
    assert table == [(p["min"][0], p["opt"][0], p["max"][0]) for p in meta["profiles"]]
    assert [choose_profile(table, b) for b in (1, 8, 32)] == [0, 1, 2]  # exact profiles, not the range's opt 8
    assert [choose_profile(table, b) for b in (2, 7, 9, 31)] == [3, 3, 3, 3]  # other sizes: the range


def test_an_engine_built_with_one_profile_runs_every_batch_on_it() -> None:
    table = _recorded(OLD_RECORD)
    assert table == [(1, 8, 32)]
    assert {choose_profile(table, b) for b in (1, 5, 8, 32)} == {0}
    with pytest.raises(DfqError) as err:
        choose_profile(table, 33)
    assert str(err.value) == ("batch 33 is outside the engine's profiles (batch 1..32 (opt 8)): split the batch or "
                              "rebuild with --batch covering 33")


def test_choice_rules_on_overlapping_profiles() -> None:
    table = [(1, 8, 32), (8, 8, 8), (4, 8, 16), (1, 2, 4), (2, 3, 4)]
    assert choose_profile(table, 8) == 1  # opt 8 three times: the narrowest, the exact one
    assert choose_profile([(1, 8, 32), (4, 8, 16)], 8) == 1
    assert choose_profile(table, 3) == 4  # (2, 3, 4) is tuned for 3
    assert choose_profile(table, 5) == 2  # inside 1..32 and 4..16: the narrower
    assert choose_profile([(1, 2, 8), (1, 6, 8)], 5) == 1  # same width: the opt closer to 5
    assert choose_profile([(1, 4, 8), (1, 4, 8)], 4) == 0  # a tie: the first
    no_range = batch_profiles((1, 8, 32), range_profile=False)
    with pytest.raises(DfqError, match=r"batch 5 is outside the engine's profiles \(batch 1, batch 8, batch 32\)"):
        choose_profile(no_range, 5)
    with pytest.raises(DfqError, match="no optimisation profile"):
        choose_profile([], 1)


def test_describe_and_envelope() -> None:
    table = batch_profiles((1, 8, 32))
    assert describe_profiles(table) == "batch 1, batch 8, batch 32, batch 1..32 (opt 8)"
    assert batch_envelope(table) == (1, 8, 32)
    assert batch_envelope([(1, 1, 1), (32, 32, 32)]) == (1, 1, 32)  # no range: opt of the first widest
    assert batch_envelope([(1, 8, 32)]) == (1, 8, 32)


def _input(table: list[tuple[int, int, int]]) -> TensorInfo:
    profiles = tuple(((lo, *CHW), (opt, *CHW), (hi, *CHW)) for lo, opt, hi in table)
    return TensorInfo("input", True, np.dtype(np.float32), (-1, *CHW), profiles)


def test_the_engine_checks_a_call_against_the_profile_it_chose() -> None:
    """TRTEngine.infer's feed check (no GPU needed): profile per batch, shapes within that profile."""
    inp = _input(batch_profiles((1, 8, 32)))
    assert profile_table([inp]) == [(1, 1, 1), (8, 8, 8), (32, 32, 32), (1, 8, 32)]
    assert inp.profile == ((1, *CHW), (8, *CHW), (32, *CHW))  # what the buffers hold: the largest of any
    for batch, profile in ((1, 0), (8, 1), (32, 2), (5, 3)):
        feed = {"input": np.zeros((batch, *CHW), np.float32)}
        assert check_feed(feed, [inp]) == (False, profile)
    with pytest.raises(DfqError, match="batch 33 is outside the engine's profiles"):
        check_feed({"input": np.zeros((33, *CHW), np.float32)}, [inp])
    with pytest.raises(DfqError, match=r"expects \[N, 3, 4, 4\]"):
        check_feed({"input": np.zeros((8, 3, 8, 8), np.float32)}, [inp])
    with pytest.raises(DfqError, match="float64"):
        check_feed({"input": np.zeros((8, *CHW))}, [inp])
    with pytest.raises(DfqError, match=r"engine inputs are \['input'\]"):
        check_feed({"x": np.zeros((8, *CHW), np.float32)}, [inp])
    exact = _input(batch_profiles((1, 8), range_profile=False))
    with pytest.raises(DfqError, match=r"batch 4 is outside the engine's profiles \(batch 1, batch 8\)"):
        check_feed({"input": np.zeros((4, *CHW), np.float32)}, [exact])
    old = _input([(1, 8, 32)])
    assert check_feed({"input": np.zeros((3, *CHW), np.float32)}, [old]) == (False, 0)
    assert old.profile == ((1, *CHW), (8, *CHW), (32, *CHW))
