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
    "serve": {"models", "diffusion", "samplers", "config", "sampling", "data", "interop", "eval"},
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


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "models" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ditkit.train.loop import train\nfrom ..diffusion import gaussian\n")
    assert ditkit_imports(bad) == {"train", "diffusion"}
