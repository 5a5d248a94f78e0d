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
                     "weights", "progress"), 0),
    "synth": 1, "quant": 2, "export": 3, "trt": 4, "serve": 5, "bench": 6,
    **dict.fromkeys(("pipeline", "acceptance", "gpucheck", "cli", "__main__", "__init__"), 7),
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
    for stage in ("synth", "quant", "quant/correct", "export", "trt", "serve", "bench"):
        assert (PKG / stage / "__init__.py").is_file(), stage
    assert not (PKG / "calib").exists()


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (top-level, lazy and ``TYPE_CHECKING`` imports alike).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b`` (its ``__init__``);
    relative imports are resolved against the importing module's package.
    """
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                edges |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = {m for m in edges if m in files and m != name and m.split(".")[0] == top}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package() -> None:
    graph = import_graph(PKG)
    assert len(graph) == len(MODULES) and sum(map(len, graph.values())) > 100  # the graph was really read
    assert import_cycles(graph) == [], "import circles (lazy imports count): break each so imports read one way"


def test_the_circle_check_finds_lazy_relative_and_package_circles(tmp_path: Path) -> None:
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from toy.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")  # lazy and relative
    (pkg / "sub" / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from toy.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from toy.sub import f\n")  # a name from the package's __init__
    (pkg / "d.py").write_text("import toy.sub.a\n")  # outside the circle
    graph = import_graph(pkg)
    assert graph["toy.d"] == {"toy.sub.a"}
    assert import_cycles(graph) == [["toy.sub", "toy.sub.a", "toy.sub.b", "toy.sub.c"]]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(pkg)) == []
