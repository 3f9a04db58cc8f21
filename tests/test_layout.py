"""The house's one direction of travel, checked statically (imports inside functions count too):
studies/ orchestrates and may import anything; models/ and metrics/ never import studies/ or reports/;
reports/ reads MLflow only and never imports models/ (of studies/ only the dependency-free work-dir layout)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
# room -> package prefixes it must never import, and the exact modules exempt from that rule
FORBIDDEN = {
    "models": (("diffablate.studies", "diffablate.reports"), ()),
    "metrics": (("diffablate.studies", "diffablate.reports"), ()),
    "reports": (("diffablate.models", "diffablate.studies"), ("diffablate.studies.workdir",)),
}


def imported_modules(source: str) -> list[str]:
    """What each `import` / `from ... import` in `source` names: `a.b` for `import a.b`, `a.b.c` for
    `from a.b import c` (a relative import keeps its leading dots)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out += [f"{base}.{a.name}" for a in node.names]
    return out


def violations(room: str) -> list[str]:
    prefixes, allowed = FORBIDDEN[room]
    bad = []
    for path in sorted((PACKAGE / room).glob("*.py")):
        for name in imported_modules(path.read_text()):
            exempt = any(name == a or name.startswith(a + ".") for a in allowed)
            if name.startswith(".") or (name.startswith(prefixes) and not exempt):  # relative: could go anywhere
                bad.append(f"{room}/{path.name} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_in_one_direction(room: str) -> None:
    assert violations(room) == []


def test_checker_sees_a_backwards_import() -> None:
    assert imported_modules("def f():\n    from diffablate.studies import runner\n") == ["diffablate.studies.runner"]
    assert imported_modules("import diffablate.reports.build as b") == ["diffablate.reports.build"]


def test_workdir_module_is_dependency_free() -> None:
    """reports/ may import studies/workdir.py because it pulls in nothing heavy: standard library only, and
    importing it loads no mlflow, optuna, torch or sqlalchemy."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name in imported_modules((PACKAGE / "studies" / "workdir.py").read_text()):
        assert name.split(".")[0] in stdlib, name
    code = ("import sys, diffablate.studies.workdir; "
            "print(sorted(m for m in ('mlflow', 'optuna', 'torch', 'sqlalchemy', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
