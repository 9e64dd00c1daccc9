"""The layer rules of DESIGN.md, checked on the source rather than trusted."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO_ROOT

FORBIDDEN_IN_CORE = {"ray", "deepspeed", "mlflow"}


def imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_perceiver_core_imports_no_ray_deepspeed_or_mlflow() -> None:
    offenders = {
        str(p.relative_to(REPO_ROOT)): sorted(imported_roots(p) & FORBIDDEN_IN_CORE)
        for p in (REPO_ROOT / "perceiver_core").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_perceiver_core_imports_nothing_from_the_layers_above() -> None:
    above = {"pipelines", "jobs"}
    for path in (REPO_ROOT / "perceiver_core").rglob("*.py"):
        assert not imported_roots(path) & above, path


def test_data_half_of_perceiver_core_does_not_import_torch() -> None:
    code = (
        "import sys, perceiver_core, perceiver_core.masking, perceiver_core.packing;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
