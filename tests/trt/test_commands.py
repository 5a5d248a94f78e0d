"""trtexec and polygraphy command lines rendered from a plan, read back as those tools parse them (CPU)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from dfq_deploy.cli import main
from dfq_deploy.errors import DfqError
from dfq_deploy.trt.commands import (
    nvidia_commands,
    polygraphy_command,
    shell_line,
    trtexec_command,
    trtexec_time_command,
)
from dfq_deploy.trt.plan import EnginePlan
from dfq_deploy.trt.planner import plan_build
from tests.trt.graphs import CHW, save_calib, save_model


def _trtexec_profiles(args: list[str]) -> list[tuple[tuple[int, ...], ...]]:
    """Profiles as trtexec 10.3-11.1 reads them (``getOptimizationProfiles``): ``--profile=N`` followed at once by
    its ``--minShapes``, ``--optShapes`` and ``--maxShapes`` (in any order), indices contiguous from 0."""
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for pos, arg in enumerate(args):
        if not arg.startswith("--profile="):
            continue
        index = int(arg.split("=", 1)[1])
        assert index not in found, "Optimization profile index cannot be the same."
        shapes = {}
        for follow in args[pos + 1:pos + 4]:
            flag, spec = follow.split("=", 1)
            assert flag in ("--minShapes", "--optShapes", "--maxShapes"), follow
            name, dims = spec.rsplit(":", 1)
            assert name == "input"
            shapes[flag] = tuple(int(d) for d in dims.split("x"))
        found[index] = shapes
    shape_flags = [a for a in args if a.startswith(("--minShapes", "--optShapes", "--maxShapes"))]
    assert len(shape_flags) == 3 * len(found)  # none outside a --profile block
    assert sorted(found) == list(range(len(found)))
    return [(p["--minShapes"], p["--optShapes"], p["--maxShapes"]) for _, p in sorted(found.items())]


def _polygraphy_parser() -> argparse.ArgumentParser:
    """The ``polygraphy run`` options the line uses, declared as Polygraphy 0.49.13-0.49.27 declares them."""
    p = argparse.ArgumentParser(prog="polygraphy run")
    p.add_argument("model_file")
    for flag in ("--trt", "--onnxrt", "--strongly-typed", "--fp16", "--int8"):
        p.add_argument(flag, action="store_true")
    for flag in ("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes"):
        p.add_argument(flag, action="append", nargs="+", default=[])
    p.add_argument("--optimization-profile", type=int)
    p.add_argument("--input-shapes", "--inputs", nargs="+")
    p.add_argument("--pool-limit", "--memory-pool-limit", nargs="+")
    for flag in ("--load-timing-cache", "--calibration-cache"):
        p.add_argument(flag)
    for flag in ("--atol", "--rtol", "--check-error-stat"):
        p.add_argument(flag, nargs="+")
    return p


def _poly_shape(spec: str) -> tuple[int, ...]:
    m = re.fullmatch(r"input:\[([0-9,]+)\]", spec)
    assert m, spec
    return tuple(int(d) for d in m.group(1).split(","))


def test_trtexec_builds_the_plans_profiles(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8", timing_cache=tmp_path / "t.cache",
                      workspace_mb=512)
    args = trtexec_command(plan)
    assert args[:4] == ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={plan.output}", "--stronglyTyped"]
    assert _trtexec_profiles(args) == [(p.min, p.opt, p.max) for p in plan.profiles]
    assert "--memPoolSize=workspace:512" in args and f"--timingCacheFile={tmp_path / 't.cache'}" in args
    assert args[-2:] == ["--profilingVerbosity=detailed", "--skipInference"]
    assert not any(a in ("--fp16", "--int8", "--best") for a in args)  # strongly typed: the graph's types
    assert shlex.split(shell_line(args)) == args
    no_cache = trtexec_command(plan_build(save_model(tmp_path, "fp16", name="f.onnx"), "fp16", batch="8"))
    assert not any(a.startswith("--timingCacheFile") for a in no_cache)
    assert _trtexec_profiles(no_cache) == [((8, *CHW), (8, *CHW), (8, *CHW))]


def test_trtexec_for_the_calibrator_route_and_an_old_plan(tmp_path: Path) -> None:
    calib = plan_build(save_model(tmp_path, "fp32"), "int8", calibrator="synthetic", calib_from=save_calib(tmp_path),
                       calib_batch_size=2)
    args = trtexec_command(calib)
    assert "--stronglyTyped" not in args and {"--fp16", "--int8"} <= set(args)
    assert f"--calib={calib.calibrator.cache_file}" in args  # the cache dfq-deploy build wrote
    old = plan_build(save_model(tmp_path, "int8", name="q.onnx"), "int8").to_dict()
    old["profile"] = old.pop("profiles")[-1]  # a plan from before per-batch profiles: 1..32, opt 8
    one = trtexec_command(EnginePlan.from_dict(old))
    assert _trtexec_profiles(one) == [((1, *CHW), (8, *CHW), (32, *CHW))]


def test_trtexec_times_each_batch_on_its_profile(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8")
    assert trtexec_time_command(plan, 8) == ["trtexec", f"--loadEngine={plan.output}", "--useProfile=1",
                                             "--shapes=input:8x3x4x4", "--useCudaGraph"]
    assert "--useProfile=3" in trtexec_time_command(plan, 5)  # the range profile
    with pytest.raises(DfqError, match="batch 64 is outside"):
        trtexec_time_command(plan, 64)


def test_polygraphy_compares_the_same_build_with_onnxruntime(tmp_path: Path) -> None:
    plan = plan_build(save_model(tmp_path, "int8", dtype="fp16"), "int8", timing_cache=tmp_path / "t.cache")
    args = polygraphy_command(plan, batch=8)
    assert args[:5] == ["polygraphy", "run", plan.onnx, "--trt", "--onnxrt"]
    ns = _polygraphy_parser().parse_args(args[2:])
    assert ns.trt and ns.onnxrt and ns.strongly_typed and not (ns.fp16 or ns.int8)
    got = [tuple(_poly_shape(s[0]) for s in shapes)
           for shapes in (ns.trt_min_shapes, ns.trt_opt_shapes, ns.trt_max_shapes)]
    assert list(zip(*got, strict=True)) == [(p.min, p.opt, p.max) for p in plan.profiles]
    assert ns.optimization_profile == 1 and _poly_shape(ns.input_shapes[0]) == (8, *CHW)
    assert ns.pool_limit == ["workspace:1024M"] and ns.load_timing_cache == str(tmp_path / "t.cache")
    assert (ns.atol, ns.rtol, ns.check_error_stat) == (["0.1"], ["0.05"], ["median"])  # quantized graph
    default = _polygraphy_parser().parse_args(polygraphy_command(plan)[2:])
    assert default.optimization_profile == 0 and _poly_shape(default.input_shapes[0]) == (1, *CHW)
    assert shlex.split(shell_line(args)) == args  # the brackets are quoted for the shell
    fp16 = _polygraphy_parser().parse_args(polygraphy_command(plan_build(
        save_model(tmp_path, "fp16", name="h.onnx"), "fp16"))[2:])
    assert (fp16.atol, fp16.rtol, fp16.check_error_stat) == (["0.02"], ["0.02"], ["elemwise"])
    fp32 = _polygraphy_parser().parse_args(polygraphy_command(plan_build(
        save_model(tmp_path, "fp32", name="s.onnx"), "fp32"))[2:])
    assert fp32.atol is None and fp32.rtol is None  # Polygraphy's own defaults suit FP32


def test_build_record_and_dry_run_carry_both_lines(tmp_path: Path, capsys) -> None:
    onnx_path = save_model(tmp_path, "int8", dtype="fp16")
    plan = plan_build(onnx_path, "int8", batch="1,4")
    cmds = nvidia_commands(plan)
    assert cmds["trtexec"] == shell_line(trtexec_command(plan))
    assert cmds["polygraphy"] == shell_line(polygraphy_command(plan, 1))
    assert sorted(cmds["trtexec_time"]) == ["1", "4"]  # the range profile 1..4 is tuned for 4 too
    assert main(["build", str(onnx_path), "--precision", "int8", "--batch", "1,4", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert EnginePlan.from_dict(json.loads(out)) == plan  # stdout stays the plan's JSON
    assert cmds["trtexec"] in err and cmds["polygraphy"] in err
    assert main(["build", str(onnx_path), "--batch", "1,4", "--no-range-profile", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert EnginePlan.from_json(out).batch_table == [(1, 1, 1), (4, 4, 4)] and "--profile=2" not in err
