"""The import contract: graphopt's layers import downward only, and the core holds no cycle.

The import graph is read from the source (every `import`, at module level or inside a
function; imports under `if TYPE_CHECKING:` never run and are left out), so a deferred import
cannot hide an upward edge. Every module must be placed in a layer: a new module that is not
fails here until its place is decided.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"graphopt": REPO / "graphopt", "graphopt.passes": REPO / "passes",
           "graphopt.backends": REPO / "backends", "graphopt.train": REPO / "train"}

# Lowest first. A module may import modules of its own layer (without a cycle) and of any
# layer below it; a prefix ending in "." names every module of that package.
LAYERS = [
    ("base", {"graphopt.errors", "graphopt.dtypes", "graphopt.plugins", "graphopt.manifest", "graphopt.fileutil",
              "graphopt.progress", "graphopt.click_types"}),
    ("ir", {"graphopt.ir", "graphopt.onnx_proto", "graphopt.weights_file", "graphopt.text"}),
    ("ops", {"graphopt.registry", "graphopt.builder", "graphopt.ops", "graphopt.ops."}),
    ("analysis", {"graphopt.onnx_io", "graphopt.interpreter", "graphopt.verify", "graphopt.symbolic",
                  "graphopt.layout", "graphopt.sample_inputs"}),
    ("pass API", {"graphopt.pattern", "graphopt.pass_manager"}),
    ("passes", {"graphopt.passes", "graphopt.passes."}),
    ("lowering", {"graphopt.lowering"}),
    ("backends", {"graphopt.backends", "graphopt.backends."}),
    ("driver and CLI", {"graphopt", "graphopt.__main__", "graphopt.artifact", "graphopt.driver", "graphopt.cli",
                        "graphopt.compare", "graphopt.compare.", "graphopt.generation", "graphopt.generation_cli",
                        "graphopt.generation_text", "graphopt.generation_files",
                        "graphopt.genai",
                        "graphopt.accuracy", "graphopt.accuracy_guard", "graphopt.calibration", "graphopt.evaluation",
                        "graphopt.pruning",
                        "graphopt.models", "graphopt.summary", "graphopt.testing", "graphopt.frontends",
                        "graphopt.frontends."}),
]
# train/ knows nothing of the compiler: it may import only the base layer.
TRAIN = ("graphopt.train", "graphopt.train.")
# The core may defer an import of its own modules only to keep a command fast to start (the
# CLI, its command modules and the lazy top-level API), or, in compare's memory child process,
# to import only the runtime of the cell it measures. Everything else imports at module level.
DEFERRED_OK = {"graphopt", "graphopt.cli", "graphopt.compare", "graphopt.compare.command",
               "graphopt.compare.memory", "graphopt.generation_cli"}


def module_name(path: Path) -> str:
    for pkg, folder in sorted(FOLDERS.items(), key=lambda kv: -len(kv[0])):
        if folder in path.parents or path.parent == folder:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([pkg, *parts])
    raise ValueError(path)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str) -> list[tuple[str, bool, int]]:
    """(imported graphopt module, inside a function?, line) for every import in `path`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            targets = []
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                # `from pkg import sub` imports pkg too, but that is the package a submodule
                # belongs to, not an edge of its own; `from pkg import name` is an edge to pkg.
                targets = [f"{mod}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            for t in targets:
                if t == "graphopt" or t.startswith("graphopt."):
                    found.append((t, in_function, child.lineno))
            visit(child, in_function)

    visit(ast.parse(path.read_text()), False)
    return found


def import_graph():
    modules = {}
    for folder in FOLDERS.values():
        for path in folder.rglob("*.py"):
            if ".venv" not in path.parts and "__pycache__" not in path.parts:
                modules[module_name(path)] = path
    edges = []
    for name, path in modules.items():
        for target, deferred, line in imports_of(path, name):
            # `from graphopt.x import y` names a module when y is one, else an attribute of x
            if target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                edges.append((name, target, deferred, f"{modules[name].relative_to(REPO)}:{line}"))
    return modules, edges


def layer_of(module: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        if module in members or any(m.endswith(".") and module.startswith(m) for m in members):
            return i
    return None


MODULES, EDGES = import_graph()


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None and not (m == TRAIN[0] or m.startswith(TRAIN[1])))
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def upward(edges) -> list[str]:
    return [f"{where}: {src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
            for src, dst, _, where in edges
            if layer_of(src) is not None and layer_of(dst) is not None and layer_of(dst) > layer_of(src)]


def train_imports(edges) -> list[str]:
    return [f"{where}: {src} imports {dst}" for src, dst, _, where in edges
            if (src == TRAIN[0] or src.startswith(TRAIN[1])) and not (dst == TRAIN[0] or dst.startswith(TRAIN[1]))
            and layer_of(dst) != 0]


def cycles(edges) -> list[list[str]]:
    return list(nx.simple_cycles(nx.DiGraph((src, dst) for src, dst, _, _ in edges
                                            if src != "graphopt" and dst != "graphopt")))


def deferred_in_core(edges) -> list[str]:
    """Function-level imports of graphopt modules by core modules. Frontends and train/ (whose
    modules import torch at module scope) may be imported late, and may import late."""
    return [f"{where}: {src} imports {dst} inside a function" for src, dst, deferred, where in edges
            if deferred and layer_of(src) is not None and src not in DEFERRED_OK
            and not src.startswith(("graphopt.frontends", "graphopt.train")) and layer_of(dst) is not None
            and not dst.startswith(("graphopt.frontends", "graphopt.train"))]


def test_layers_import_downward_only():
    bad = upward(EDGES)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_train_knows_nothing_of_the_compiler():
    bad = train_imports(EDGES)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    found = cycles(EDGES)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in found[:5])


def test_the_core_defers_no_import_of_its_own_modules():
    bad = deferred_in_core(EDGES)
    assert not bad, "\n".join(bad)


def test_each_check_catches_what_it_is_for():
    def edge(src, dst, deferred=False):
        return (src, dst, deferred, "made-up.py:1")

    assert upward([edge("graphopt.ir", "graphopt.passes.cleanup.dce")])
    assert not upward([edge("graphopt.passes.cleanup.dce", "graphopt.ir")])
    assert cycles([edge("graphopt.registry", "graphopt.builder"), edge("graphopt.builder", "graphopt.registry")])
    assert train_imports([edge("graphopt.train.trainer", "graphopt.ir")])
    assert not train_imports([edge("graphopt.train.trainer", "graphopt.errors")])
    assert deferred_in_core([edge("graphopt.verify", "graphopt.registry", deferred=True)])
    assert not deferred_in_core([edge("graphopt.cli", "graphopt.driver", deferred=True)])
