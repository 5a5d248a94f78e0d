"""Finding TensorRT and a GPU without importing TensorRT at import time; the one shared logger; CUDA backends."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.trt.cuda import select_backend
from dfq_deploy.trt.env import (
    TRT_MISSING_MESSAGE,
    gpu_available,
    require_tensorrt,
    trt_logger,
    trt_severity_level,
)
from tests.trt.graphs import HAS_TRT


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# --- importing never needs TensorRT -----------------------------------------------------------------------
def test_importing_the_module_does_not_import_tensorrt() -> None:
    modules = ", ".join(f"dfq_deploy.trt.{m}" for m in ("env", "cuda", "plan", "planner", "calibrator",
                                                        "build", "timing", "engine", "inspector"))
    code = (f"import sys, dfq_deploy.trt, {modules}; "
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_tensorrt_module_imports_tensorrt_and_only_inside_functions() -> None:
    pkg = Path(__import__("dfq_deploy").__file__).parent
    found: list[tuple[str, bool]] = []
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "tensorrt" or n.startswith("tensorrt.") for n in names):
                p, in_function = node, False
                while p in parents:
                    p = parents[p]
                    in_function |= isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef)
                found.append((str(path.relative_to(pkg)), in_function))
    assert found, "expected require_tensorrt to import tensorrt"
    others = sorted(f for f, _ in found if Path(f).parts[0] != "trt")
    assert not others, (f"{others} import tensorrt: only dfq_deploy/trt/ may (use "
                        "dfq_deploy.trt.env.require_tensorrt() or tensorrt_version())")
    assert all(inside for _, inside in found), "tensorrt must be imported inside functions only"


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_require_tensorrt_names_how_to_install() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    assert str(info.value) == TRT_MISSING_MESSAGE
    assert isinstance(info.value, DfqError)
    assert "dfq-deploy[trt]" in str(info.value) and "JetPack" in str(info.value)
    with pytest.raises(MissingDependencyError):
        trt_logger()  # nothing cached without TensorRT


def test_gpu_available_agrees_with_cuda_runtime() -> None:
    cudart = pytest.importorskip("cuda.bindings.runtime")
    err, count = cudart.cudaGetDeviceCount()
    ok, reason = gpu_available()
    assert ok == (int(err) == 0 and count > 0)
    assert reason
    if not ok and int(err) != 0:
        assert err.name in reason




def _calls(name: str) -> list[tuple[str, ast.Call]]:
    """Every ``<x>.<name>(...)`` call in dfq_deploy/trt, with its file."""
    pkg = Path(__import__("dfq_deploy").__file__).parent / "trt"
    return [(p.name, node) for p in sorted(pkg.glob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name]


def _is_shared_logger(arg: ast.expr) -> bool:
    return isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "trt_logger"


def test_every_builder_runtime_and_parser_gets_the_shared_logger() -> None:
    """One logger per process: the contract of :func:`trt_logger`, checked on the source (no TensorRT here)."""
    made = {name: _calls(name) for name in ("Builder", "Runtime", "OnnxParser")}
    assert {f for f, _ in made["Builder"]} == {"build.py"}
    assert {f for f, _ in made["Runtime"]} == {"engine.py", "inspector.py"}
    assert {f for f, _ in made["OnnxParser"]} == {"build.py"}
    for name, calls in made.items():
        for file, call in calls:
            assert _is_shared_logger(call.args[-1]), f"{file}:{call.lineno}: {name} without trt_logger()"
    pkg = Path(__import__("dfq_deploy").__file__).parent / "trt"
    assert not [p.name for p in pkg.glob("*.py") if "make_trt_logger" in p.read_text()]


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (the GPU machine runs this)")
def test_trt_logger_is_created_once() -> None:
    trt = require_tensorrt()
    first = trt_logger()
    assert isinstance(first, trt.ILogger)
    assert trt_logger() is first


def test_trt_severity_level() -> None:
    import logging

    assert trt_severity_level("Severity.ERROR") == logging.ERROR
    assert trt_severity_level("INTERNAL_ERROR") == logging.CRITICAL
    assert trt_severity_level("WARNING") == logging.WARNING
    assert trt_severity_level("INFO") == logging.DEBUG
    assert trt_severity_level("VERBOSE") < logging.DEBUG



# --- CUDA backend choice ----------------------------------------------------------------------------------
def test_select_backend() -> None:
    with pytest.raises(DfqError, match="choose one of cuda-python, pycuda"):
        select_backend("cupy")
    if _has("cuda.bindings"):
        assert select_backend() == "cuda-python"
        assert select_backend("cuda-python") == "cuda-python"
    if not _has("pycuda"):
        with pytest.raises(MissingDependencyError, match="pip install pycuda"):
            select_backend("pycuda")
    if not _has("cuda.bindings") and not _has("pycuda"):
        with pytest.raises(MissingDependencyError, match="cuda-python"):
            select_backend()


