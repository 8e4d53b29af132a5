"""The package's layering holds: no runtime import of test helpers, pure ops/selection, no import cycles
(``TYPE_CHECKING`` imports included), torch-free config sections."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

PKG = REPO / "megatron_tip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(body: list[ast.stmt], *, type_checking: bool) -> list[ast.stmt]:
    """The statements that run at import (class bodies and ``if``/``try``/``with`` blocks, not function
    bodies); ``type_checking``: also those under ``if TYPE_CHECKING:`` (imported by type checkers)."""
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not type_checking:
            out += _module_level(node.orelse, type_checking=type_checking)
            continue
        out.append(node)
        for name in ("body", "orelse", "finalbody", "handlers"):
            out += _module_level(getattr(node, name, []), type_checking=type_checking)
    return out


def _imports(path: Path, *, top_level_only: bool, type_checking: bool = True,
             prefix: str = "megatron_tip") -> set[str]:
    """Modules starting with ``prefix`` imported by ``path``: anywhere, or only at module level
    (``TYPE_CHECKING`` blocks included unless ``type_checking=False``)."""
    tree = ast.parse(path.read_text())
    nodes = _module_level(tree.body, type_checking=type_checking) if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(prefix)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(prefix):
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
    allowed = (f"megatron_tip.{pkg}", "megatron_tip.seeding", "megatron_tip.validation", "megatron_tip.lazy_exports")
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


# The config sections and what they need: plain dataclasses and range checks, no torch, no runtime module.
CONFIG_MODULES = {"megatron_tip.config", "megatron_tip.sections", "megatron_tip.validation", "megatron_tip.lazy_exports",
                  "megatron_tip.ops.impls"} | {m for m in MODULES if m.endswith(".config")}
CONFIG_THIRD_PARTY = {"yaml"}


def test_config_modules_import_only_config_modules():
    """Each config module, and the package ``__init__`` it runs, imports at import time only config
    modules, the standard library and yaml (annotation-only imports under TYPE_CHECKING excepted)."""
    inits = {m.rsplit(".", 1)[0] for m in CONFIG_MODULES if m.count(".") > 1}
    for mod in sorted(CONFIG_MODULES | inits):
        path = PKG.joinpath(*mod.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        ours = {_resolve(i) for i in _imports(path, top_level_only=True, type_checking=False)} - {mod}
        assert ours <= CONFIG_MODULES | {"megatron_tip"}, f"{mod} imports {sorted(ours - CONFIG_MODULES)}"
        other = {i.split(".")[0] for i in _imports(path, top_level_only=True, type_checking=False, prefix="")}
        other -= set(sys.stdlib_module_names) | CONFIG_THIRD_PARTY | {"megatron_tip", "__future__"}
        assert not other, f"{mod} imports {sorted(other)}"


def test_importing_the_config_loads_no_torch_or_megatron(tmp_path):
    """What the static check above cannot see (package ``__init__`` side effects, a re-export): a fresh
    interpreter reads a config and builds a RunConfig with neither torch nor megatron imported."""
    (tmp_path / "run.yaml").write_text("train:\n  steps: 3\nrollout:\n  engine: vllm\n")
    code = (
        "import sys\n"
        "from megatron_tip.config import RunConfig, load_config\n"
        "cfg = load_config(sys.argv[1], ['selection.keep_ratio=0.25'])\n"
        "assert (cfg.train.steps, cfg.rollout.engine, cfg.selection.keep_ratio) == (3, 'vllm', 0.25)\n"
        "assert RunConfig().to_dict() == load_config(None, []).to_dict()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers', 'numpy'))\n"
        "print(len([m for m in sys.modules if m.startswith('megatron_tip')]), heavy[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run.yaml")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.split(" ", 1)
    assert heavy.strip() == "[]", out.stdout
    assert int(count) < len(MODULES) // 3, out.stdout  # the config modules, not the package



@pytest.mark.parametrize("pkg", sorted(m for m in MODULES if (PKG.joinpath(*m.split(".")[1:]) / "__init__.py").is_file()))
def test_package_names_resolve(pkg):
    """Every name a package lists in ``__all__`` (lazy ones included) is importable from it."""
    import importlib

    module = importlib.import_module(pkg)
    for name in getattr(module, "__all__", []):
        assert getattr(module, name) is not None and name in dir(module), f"{pkg}.{name}"


def test_old_section_import_paths_still_resolve():
    """The sections' import paths from before they became torch-free (other branches use them)."""
    from megatron_tip import checkpoint, data, eval, sections
    from megatron_tip import distributed, metrics_log, optim, scoring, trainer
    from megatron_tip.checkpoint import training
    from megatron_tip.data import dataset
    from megatron_tip.eval import heldout

    assert (trainer.TrainConfig, scoring.ScoringConfig, optim.OptimConfig, distributed.ParallelConfig,
            metrics_log.LogConfig) == (sections.TrainConfig, sections.ScoringConfig, sections.OptimConfig,
                                       sections.ParallelConfig, sections.LogConfig)
    assert training.RunDirConfig is checkpoint.config.RunDirConfig
    assert dataset.DataConfig is data.DataConfig is data.config.DataConfig
    assert heldout.EvalConfig is eval.config.EvalConfig
