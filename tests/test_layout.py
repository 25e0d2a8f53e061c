"""The package's shape: layers whose arrows only point down, no import cycles (imports inside
functions included), private names private to their package, and a docstring on every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnclip"

# A module may import from its own layer and the layers below it. index and train stand side
# by side: neither needs the other, and keeping them apart keeps `cnclip search` torch-free.
LAYERS = {"cnclip": 0, "model": 1, "index": 2, "train": 2, "app": 3}
ENTRY_POINTS = {"cnclip.__main__"}  # `python -m cnclip` is the CLI itself


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    # `if TYPE_CHECKING:` imports exist for annotations only and never run
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported cnclip module, names taken from it) for every import statement in module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text("utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "cnclip"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cnclip":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
            found += [(m, []) for m in submodules]
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name) if target in MODULES} - {name} for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "cnclip"


def test_the_walk_sees_the_packages_and_function_level_imports():
    assert {"cnclip.model.clip", "cnclip.index.index", "cnclip.train.contrastive", "cnclip.app.cli"} <= set(MODULES)
    # model.clip imports the ONNX exporter inside a method: the walk must count it
    assert "cnclip.model.onnx_export" in _graph()["cnclip.model.clip"]


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_arrows_point_down():
    wrong = []
    for name, targets in _graph().items():
        for target in targets:
            mine, theirs = _layer(name), _layer(target)
            if target == "cnclip" or name in ENTRY_POINTS:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def _in_cli(name: str) -> bool:
    return name == "cnclip.app.cli" or name.startswith("cnclip.app.cli.")


def test_nothing_imports_the_cli():
    users = [
        name
        for name, targets in _graph().items()
        if any(map(_in_cli, targets)) and not _in_cli(name) and name not in ENTRY_POINTS
    ]
    assert not users, f"{users} import the CLI; library code raises, only cnclip.app.cli prints and exits"


def test_private_names_stay_in_their_package():
    leaks = []
    for name in MODULES:
        for target, names in _imports(name):
            if _layer(target) != _layer(name):
                leaks += [f"{name} takes {n} from {target}" for n in names if n.startswith("_") and n != "__version__"]
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_owns(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text("utf-8")))
    assert doc and doc.splitlines()[0].strip(), f"{MODULES[name]} has no opening docstring line"
