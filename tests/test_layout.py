"""The package layout: stages in folders, imports running one way (no module imports a later stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dfq_deploy"

#: Stage of each top-level part of the package, in pipeline order; a module may import its own stage or an
#: earlier one. Shared helpers come first; the job, the CLI and the package's lazy API last.
STAGES = {
    **dict.fromkeys(("errors", "registry", "utils", "config", "device", "models", "data", "calib_images",
                     "weights"), 0),
    "synth": 1, "quant": 2, "export": 3, "trt": 4, "bench": 5,
    **dict.fromkeys(("pipeline", "acceptance", "cli", "__main__", "__init__"), 6),
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``dfq_deploy`` module this file imports, also inside functions (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names[:1] if n.startswith("dfq_deploy")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dfq_deploy")]
    return found


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts)


MODULES = sorted(p for p in PKG.rglob("*.py"))


def test_every_part_has_a_stage() -> None:
    parts = {_part(_module_of(p)) for p in MODULES}
    assert parts <= set(STAGES), f"give these a stage: {sorted(parts - set(STAGES))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_a_later_stage(path: Path) -> None:
    here = _module_of(path)
    stage = STAGES[_part(here)]
    later = [(line, mod) for line, mod in _imports(path)
             if mod != "dfq_deploy" and STAGES.get(_part(mod), 0) > stage]
    assert not later, f"{here} (stage {stage}) imports later stages: {later}"


def test_the_stages_are_folders_a_newcomer_can_find() -> None:
    for stage in ("synth", "quant", "quant/correct", "export", "trt", "bench"):
        assert (PKG / stage / "__init__.py").is_file(), stage
    assert not (PKG / "calib").exists()
