"""The package's shape: layers whose arrows only point down, no import cycles (imports inside
functions and those made only for annotations under `if TYPE_CHECKING:` included: a type named
in a signature is a dependency too), private names private to their package, and a docstring on
every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnclip"

# A module may import from its own layer and the layers below it. index and train stand side
# by side: neither needs the other, and keeping them apart keeps `cnclip search` torch-free.
LAYERS = {"cnclip": 0, "model": 1, "index": 2, "train": 2, "app": 3}
ENTRY_POINTS = {"cnclip.__main__"}  # `python -m cnclip` is the CLI itself
# The public API (`cnclip/__init__.py`) names what every layer offers, lazily: a facade above the
# layers, not layer 0. Modules reach their siblings at the top with `from cnclip import atomic`,
# which depends on atomic alone.
FACADE = "cnclip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported cnclip module, names taken from it) for every import statement in module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text("utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
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
            taken = [n for n in names if f"{target}.{n}" not in MODULES]
            if taken or not submodules:  # `from cnclip import atomic` depends on atomic, not on the facade
                found.append((target, taken))
            found += [(m, []) for m in submodules]
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name) if target in MODULES} - {name} for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "cnclip"


def test_the_walk_sees_the_packages_and_function_level_imports():
    assert {"cnclip.model.clip", "cnclip.index.index", "cnclip.train.contrastive", "cnclip.app.cli"} <= set(MODULES)
    # model.clip imports the encoder inside a method (its deprecated helpers): the walk must count it
    assert "cnclip.model.encoder" in _graph()["cnclip.model.clip"]


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan): every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = {stack.pop()}
            while node not in members:
                members.add(stack.pop())
            if len(members) > 1:
                found.append(frozenset(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [frozenset({"a", "b", "c"})]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_circle():
    circles = _circles(_graph())
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def test_arrows_point_down():
    wrong = []
    for name, targets in _graph().items():
        for target in targets:
            mine, theirs = _layer(name), _layer(target)
            if target == FACADE or name in (FACADE, *ENTRY_POINTS):
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
