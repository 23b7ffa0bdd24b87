"""Imports go one way (docs/architecture.md): models/ and samplers/ import torch only, diffusion/
imports only itself, serve/ never imports train/. Read from the source so a violation fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ditkit"

# room -> ditkit rooms it may import (besides itself)
ALLOWED = {
    "models": set(),
    "samplers": set(),
    "diffusion": set(),
    "serve": {"models", "diffusion", "samplers", "config", "sampling", "data", "interop", "eval", "checkpoint_io", "device",
              "text_sampling"},
}


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


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports_only_what_it_may(room):
    files = sorted((PACKAGE / room).glob("*.py"))
    assert files, f"room {room} has no modules"
    for path in files:
        bad = ditkit_imports(path) - ALLOWED[room] - {room}
        assert not bad, f"{path.relative_to(PACKAGE)} imports ditkit.{bad}: against docs/architecture.md"


def test_models_and_samplers_import_no_third_party_but_torch():
    allowed_top = {"torch", "math", "typing", "__future__", "dataclasses", "collections", "functools", "ditkit"}
    for room in ("models", "samplers"):
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
    # the walk follows serve -> sampling -> its checkpoint reader, so it would see sampling's imports
    assert {"ditkit.sampling", "ditkit.checkpoint_io"} <= reachable_modules(PACKAGE / "serve" / "app.py")


def test_transitive_walk_sees_an_indirect_violation():
    reached = reachable_modules(PACKAGE / "cli.py")  # cli composes everything, train included
    assert "ditkit.train.loop" in reached and "ditkit.train.checkpoint" in reached


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "models" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ditkit.train.loop import train\nfrom ..diffusion import gaussian\n")
    assert ditkit_imports(bad) == {"train", "diffusion"}
