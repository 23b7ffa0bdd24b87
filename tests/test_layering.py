"""Imports go one way (docs/architecture.md): every room of the package imports only the rooms listed
for it below, serve/ never reaches train/, and no room imports another that imports it back (no
cycles). Read from the source (top-level and function-level imports alike), so a violation fails
here; a new room fails until it is given its place in ALLOWED and in docs/architecture.md."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ditkit"

# room -> ditkit rooms it may import (besides itself). The pure rooms (models, samplers, diffusion)
# import torch and the two leaf modules (registry: the tables they register into; errors).
LEAF = {"errors", "registry"}
ALLOWED = {
    "errors": set(),
    "registry": {"errors"},
    "config": {"errors", "registry", "fileio"},
    "fileio": set(),
    "media": {"fileio"},
    "progress": set(),
    "cache": set(),
    "safety": {"errors"},
    "provenance": {"fileio", "errors"},
    "models": LEAF,
    "samplers": LEAF,
    "diffusion": LEAF,
    "checkpoint_io": {"config", "errors"},
    "device": {"config", "errors"},
    "recipes": {"config", "errors", "registry"},
    "data": {"fileio", "config", "errors", "registry", "cache", "models", "media"},
    "builders": {"config", "errors", "registry", "checkpoint_io", "models", "diffusion", "data"},
    "interop": {"fileio", "config", "errors", "registry", "checkpoint_io", "builders", "models", "data", "cache"},
    "pipelines": {"fileio", "config", "errors", "registry", "checkpoint_io", "builders", "models", "diffusion", "samplers",
                  "data", "device", "media", "progress", "interop", "adapters", "provenance", "safety"},
    "adapters": {"fileio", "config", "errors", "registry", "checkpoint_io", "models", "interop"},
    "eval": {"fileio", "config", "errors", "registry", "checkpoint_io", "builders", "data", "device", "diffusion", "models",
             "pipelines", "cache", "media", "progress"},
    "serve": {"config", "errors", "registry", "checkpoint_io", "builders", "pipelines", "media", "adapters", "safety",
              "provenance"},
    "train": {"fileio", "config", "errors", "registry", "checkpoint_io", "builders", "models", "diffusion", "samplers", "data",
              "device", "eval", "interop", "pipelines", "media", "progress", "adapters"},
    "sweep": {"fileio", "config", "checkpoint_io", "pipelines", "eval", "train"},
    "cli": None,  # composes everything
}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ditkit"


def ditkit_imports(path: Path) -> set[str]:
    """The top-level ditkit rooms a module imports, e.g. {"models", "diffusion"}."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            rel = (node.module or "").split(".")[0]
            if node.level == 1 and rel:
                rooms.add(path.parent.name)  # sibling module inside the same room
            elif node.level == 2 and rel:
                rooms.add(rel)
        for name in names:
            parts = name.split(".")
            if parts[0] == "ditkit" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def room_files(room: str) -> list[Path]:
    folder = PACKAGE / room
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{room}.py"]


def test_every_room_has_a_place():
    rooms = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    rooms |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms <= set(ALLOWED), f"rooms without a place in ALLOWED (and docs/architecture.md): {rooms - set(ALLOWED)}"


@pytest.mark.parametrize("room", sorted(r for r, allowed in ALLOWED.items() if allowed is not None))
def test_room_imports_only_what_it_may(room):
    files = room_files(room)
    assert all(f.is_file() for f in files), f"room {room} has no modules"
    for path in files:
        bad = {room_of(m) for m in imported_modules(path)} - ALLOWED[room] - {room, "ditkit"}
        assert not bad, f"{path.relative_to(PACKAGE)} imports ditkit.{bad}: against docs/architecture.md"


def test_models_and_samplers_import_no_third_party_but_torch():
    allowed_top = {"torch", "math", "typing", "__future__", "dataclasses", "collections", "functools", "ditkit"}
    for room in ("models", "samplers", "diffusion"):
        for path in (PACKAGE / room).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                assert tops <= allowed_top, f"{path.name} imports {tops - allowed_top}"


def _module_file(module: str) -> Path | None:
    """The source file of a dotted ``ditkit...`` module (a package's ``__init__.py``), or None."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``ditkit`` module a file may import (top-level or inside a function, absolute or
    relative), with the packages above it whose ``__init__`` runs first."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: name may be a submodule or an attribute of pkg
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] != "ditkit":
                continue
            for k in range(1, len(parts) + 1):  # ditkit, ditkit.a, ditkit.a.b: each __init__ runs
                found.add(".".join(parts[:k]))
    return {m for m in found if _module_file(m) is not None}


def reachable_modules(start: Path) -> set[str]:
    """All ditkit modules importing ``start`` can pull in, following imports transitively."""
    seen, todo = set(), [_module_name(start)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imported_modules(_module_file(module)) - seen)
    return seen


def test_serve_never_reaches_train_even_through_other_modules():
    files = sorted((PACKAGE / "serve").glob("*.py"))
    assert files
    for path in files:
        reached = reachable_modules(path)
        bad = sorted(m for m in reached if m == "ditkit.train" or m.startswith("ditkit.train."))
        assert not bad, f"{path.relative_to(PACKAGE)} reaches {bad} through its imports (serve/ never imports train/)"
    # the walk follows serve -> pipelines -> builders -> the checkpoint reader, so it would see their imports
    assert {"ditkit.pipelines.image", "ditkit.builders", "ditkit.checkpoint_io"} <= reachable_modules(PACKAGE / "serve" / "launch.py")


def test_transitive_walk_sees_an_indirect_violation():
    reached = reachable_modules(PACKAGE / "cli" / "train.py")  # cli composes everything, train included
    assert "ditkit.train.loop" in reached and "ditkit.train.checkpoint" in reached


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "models" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ditkit.train.loop import train\nfrom ..diffusion import gaussian\n")
    assert ditkit_imports(bad) == {"train", "diffusion"}


def room_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Room -> rooms it imports, from module -> modules it imports (``ditkit`` itself left out)."""
    graph: dict[str, set[str]] = {}
    for module, deps in modules.items():
        for dep in deps:
            a, b = room_of(module), room_of(dep)
            if a != b and "ditkit" not in (a, b):
                graph.setdefault(a, set()).add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_import_cycles_between_rooms():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        modules[_module_name(path)] = imported_modules(path)
    cycle = find_cycle(room_graph(modules))
    assert cycle is None, f"import cycle between rooms: {' -> '.join(cycle)}"


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    graph = room_graph({"ditkit.config": {"ditkit.data.text"}, "ditkit.data.text": {"ditkit.config"}})
    assert find_cycle(graph) is not None
