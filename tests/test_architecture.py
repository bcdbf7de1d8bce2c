"""The package's shape, checked from its source (no imports run): layers, import circles, sizes.

Layers, bottom to top; a module imports only modules of its own layer or below (docs/pages/development.md, "Layout and architecture"):
base (config, run_dir, seeding, formatting, progress) < data/ < ingest/ < modeling/ < inference, embeddings <
evaluation/ < maps/ < training/ < commands (run_regression.py, expreg/<command>.py and the documented re-export paths).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "expreg"
LAYERS = {
    "base": 0,
    "data": 1,
    "ingest": 2,
    "modeling": 3,
    "inference": 4,
    "embeddings": 4,
    "evaluation": 5,
    "maps": 6,
    "training": 7,
    "commands": 8,
}
BASE = {
    "expreg",
    "expreg.config",
    "expreg.key_suggestions",
    "expreg.run_dir",
    "expreg.seeding",
    "expreg.formatting",
    "expreg.progress",
}
# documented commands and import paths that re-export what moved (``from expreg.model import ...``)
COMMANDS = {
    "run_regression",
    *(
        f"expreg.{name}"
        for name in (
            "splits",
            "predict",
            "prepare",
            "map",
            "cv",
            "aggregate",
            "plots",
            "hub",
            "model",
            "metrics",
            "datasets",
            "reference",  # the docs' reference pages, made from every command's parser
        )
    ),
}
ACCELERATE_ALLOWED = {"training", "inference", "embeddings", "commands"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {"run_regression": REPO / "run_regression.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "metrics_module" in path.parts:  # an `evaluate` module loaded by file path, not imported
            continue
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _layer(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    if module in BASE:
        return "base"
    top = module.split(".")[1]
    assert top in LAYERS, f"{module}: in no layer; add it to tests/test_architecture.py"
    return top


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement (at any depth: lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
        for a, targets in _graph().items()
        for b in targets
        if LAYERS[_layer(b)] > LAYERS[_layer(a)]
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle():
    graph = _graph()
    for package in [m for m in graph if (PACKAGE / Path(*m.split(".")[1:]) / "__init__.py").is_file()]:
        graph[package] = set()  # a package's __init__ only re-exports its own submodules, lazily
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_accelerate_only_in_training_inference_and_commands():
    users = [
        name
        for name, path in _modules().items()
        if any(m == "accelerate" or m.startswith("accelerate.") for m in _imports(path))
        and _layer(name) not in ACCELERATE_ALLOWED
    ]
    assert not users, f"accelerate imported outside training/, inference and the commands: {users}"


def test_one_function_builds_the_accelerator():
    builders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Accelerator"
            ):
                builders.append(name)
    assert builders and set(builders) == {"expreg.training.launch"}, builders


def test_modules_and_functions_stay_short():
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "\n".join(long)
