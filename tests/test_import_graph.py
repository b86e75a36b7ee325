"""The import graph of the package: no circle in `fastalign/` and `kernels/` (`fastalign.kernels`), and no test
module importing another (what tests share lives in `tests/helpers/`).

Read from the source with `ast`: every `import` / `from ... import` statement of a module, at any depth (a
function-level import ties two modules as surely as a top-level one: `kernels/launches.py` once imported the kernel
modules inside functions while they imported it at the top, a circle of six files). An import names a module of the
package (an edge) or a name defined in a package's `__init__` (an edge to that `__init__`); third-party imports are
left out.
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (`kernels/` under the name `fastalign.kernels`)."""
    modules = {}
    for top, name in ((ROOT / "fastalign", "fastalign"), (ROOT / "kernels", "fastalign.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """The absolute dotted names `module` (at `path`) imports, each `from X import a` as `X.a` (a module, or a name
    defined in `X`)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name resolves to the longest module prefix of it)."""
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules),
                          None)
            if target is not None and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph(package_modules())
    assert "fastalign.kernels.runtime" in graph["fastalign.kernels.lse_forward"]  # the graph sees kernels/
    assert "fastalign.ops.engine" in graph["fastalign.ops.dpo"]
    assert circles(graph) == []


def test_the_circle_check_can_fail(tmp_path):
    """A circle through a function-level import, as kernels/launches.py had one, is found."""
    (tmp_path / "launches.py").write_text("def cases():\n    from .lse_forward import lse_forward_partials\n")
    assert imported_names(tmp_path / "launches.py", "fastalign.kernels.launches") == {
        "fastalign.kernels.lse_forward.lse_forward_partials"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_test_module_imports_another():
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    stems = {path.stem for path in tests}
    offenders = {}
    for path in tests:
        parts = {part for name in imported_names(path, path.stem) for part in name.split(".")}
        if parts & (stems - {path.stem}):
            offenders[str(path.relative_to(ROOT))] = sorted(parts & stems)
    assert len(tests) > 40
    assert offenders == {}, "move what these share to tests/helpers/"
