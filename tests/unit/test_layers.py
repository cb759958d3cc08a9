"""No role imports another: the queen and the hive share with the worker only what is in
rbee.link (wire types), rbee.config and rbee.errors (issue 26)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2] / "rbee"
OTHERS = {"queen": ("rbee.hive", "rbee.worker"), "hive": ("rbee.queen", "rbee.worker"),
          "worker": ("rbee.queen", "rbee.hive")}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("role", sorted(OTHERS))
def test_a_role_imports_no_other_role(role: str) -> None:
    crossing = {f"{path.relative_to(ROOT.parent)}: {name}" for path in (ROOT / role).rglob("*.py")
                for name in imported(path) if name.startswith(OTHERS[role])}
    assert not crossing, sorted(crossing)
