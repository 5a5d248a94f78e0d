"""The README's Python example runs as written (with a smaller calibration set), so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

README = Path(__file__).resolve().parents[1] / "README.md"
#: What the test shrinks: the calibration set's size and iterations (the rest runs as written).
FULL, SMALL = "CalibrationConfig(num_samples=32, iterations=200)", "CalibrationConfig(num_samples=4, iterations=2)"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = [b for b in python_blocks(README.read_text()) if "quantize_(" in b]
    assert len(blocks) == 1, "the README's API example (the block that calls quantize_) is missing or doubled"
    code = blocks[0]
    assert FULL in code, f"the example no longer says {FULL}: update this test's shrinking"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace(FULL, SMALL), str(README), "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["calib_images"].shape == (4, 3, 32, 32)
    assert scope["report"]["mode"] == "diag" and "stages" in scope["report"]
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 0  # the quantized model was exported
