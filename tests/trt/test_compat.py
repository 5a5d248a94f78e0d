"""The foreign-engine check on recorded build records (no TensorRT, no GPU)."""

from __future__ import annotations

import pytest

from dfq_deploy.trt.compat import check_engine_compat

#: what ``dfq-deploy build`` writes beside an engine built on a Jetson Orin with JetPack 6.2
ORIN = {"tensorrt_version": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7", "precision": "int8"}
ORIN_HERE = {"name": "Orin", "compute_capability": "8.7", "device": 0}


def test_same_tensorrt_and_gpu_runs() -> None:
    verdict = check_engine_compat(ORIN, "10.3.0.30", ORIN_HERE)
    assert verdict.ok and verdict.warnings == ()
    # only the build number differs: the same release
    assert check_engine_compat(ORIN, "10.3.0.26", ORIN_HERE).ok


@pytest.mark.parametrize("here", ["10.3.1.2", "10.7.0.23", "11.1.0.4", "8.6.2.3"])
def test_another_tensorrt_is_refused_naming_both(here: str) -> None:
    verdict = check_engine_compat(ORIN, here, ORIN_HERE, "model.engine")
    assert not verdict.ok
    assert "model.engine was built by TensorRT 10.3.0.30" in verdict.error
    assert f"this is TensorRT {here}" in verdict.error and "dfq-deploy build" in verdict.error
    assert "\n" not in verdict.error


def test_another_gpu_architecture_is_refused() -> None:
    desktop = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "device": 0}
    verdict = check_engine_compat(ORIN, "10.3.0.30", desktop, "model.engine")
    assert not verdict.ok
    assert "built for Orin (compute capability 8.7)" in verdict.error
    assert "NVIDIA GeForce RTX 4090 (compute capability 8.9)" in verdict.error


def test_same_architecture_other_model_only_warns() -> None:
    built = {"tensorrt_version": "10.8.0.43", "gpu": "NVIDIA A10", "compute_capability": "8.6"}
    here = {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}
    verdict = check_engine_compat(built, "10.8.0.43", here)
    assert verdict.ok and len(verdict.warnings) == 1
    assert "NVIDIA A10" in verdict.warnings[0] and "RTX 3090" in verdict.warnings[0]


def test_unknown_facts_do_not_refuse() -> None:
    assert check_engine_compat({}, "10.3.0.30", ORIN_HERE).ok
    assert "no build record" in check_engine_compat({}, "10.3.0.30", ORIN_HERE).warnings[0]
    # the GPU could not be probed, or an old record without the GPU: only the version is checked
    assert check_engine_compat(ORIN, "10.3.0.30", {}).ok
    assert check_engine_compat({"tensorrt_version": "10.3.0.30"}, "10.3.0.30", ORIN_HERE).ok
    assert not check_engine_compat({"tensorrt_version": "10.3.0.30"}, "10.4.0.1", {}).ok


def test_a_short_version_in_the_record_is_read_as_its_release() -> None:
    assert check_engine_compat({"tensorrt_version": "10.3"}, "10.3.0.30", ORIN_HERE).ok
    assert not check_engine_compat({"tensorrt_version": "10.3"}, "10.4.0.1", ORIN_HERE).ok
