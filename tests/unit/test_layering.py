"""The package's layering holds: no runtime import of test helpers, pure ops/selection, no import cycles."""
import ast
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

PKG = REPO / "megatron_tip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """megatron_tip modules imported by ``path`` (optionally only at module level, outside TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    nodes = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("megatron_tip")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("megatron_tip"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
            base = _module_name(path).split(".")
            base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


FILES = sorted(PKG.rglob("*.py"))
MODULES = {_module_name(f) for f in FILES}


def _resolve(name: str) -> str:
    """The module an import refers to (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_runtime_code_never_imports_test_helpers():
    bad = {_module_name(f): sorted(i for i in _imports(f, top_level_only=False) if i.startswith("megatron_tip.testing"))
           for f in FILES if "testing" not in f.parts}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("pkg", ["ops", "selection"])
def test_ops_and_selection_are_self_contained(pkg):
    allowed = (f"megatron_tip.{pkg}", "megatron_tip.seeding", "megatron_tip.validation")
    for f in (PKG / pkg).rglob("*.py"):
        other = {i for i in _imports(f, top_level_only=False) if not i.startswith(allowed)}
        assert not other, f"{f.name} imports {sorted(other)}"


def test_no_import_cycles_at_module_level():
    graph = {_module_name(f): {_resolve(i) for i in _imports(f, top_level_only=True)} - {_module_name(f)}
             for f in FILES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
