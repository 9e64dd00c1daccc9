"""The layer rules (the README's Layout), checked on the source rather than trusted."""

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


def test_the_ray_data_side_of_training_does_not_import_torch() -> None:
    """The crop feed and the held-out read run in Ray processes of their own, which start five
    seconds sooner without torch; the training data stack must not pull it in."""
    code = (
        "import sys, pipelines.data.feed, pipelines.data.finetune;"
        "print(sorted(m for m in ('torch', 'deepspeed', 'pipelines.train') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (functions included): a package's own
    ``__init__`` only when a name is taken from it, not when a submodule is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def _module_graph() -> dict[str, set[str]]:
    paths = {}
    for package in ("perceiver_core", "pipelines", "jobs"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            paths[name.removesuffix(".__init__")] = path
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_no_import_cycles() -> None:
    graph = _module_graph()
    cycles = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt > start and nxt not in path:  # each cycle once, from its least module
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_pipelines_never_import_jobs() -> None:
    graph = _module_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("jobs")) for m, deps in graph.items()}
    assert {m: d for m, d in offenders.items() if d and not m.startswith("jobs")} == {}


def test_no_private_names_are_imported_across_modules() -> None:
    offenders = []
    for package in ("perceiver_core", "pipelines", "jobs", "benchmarks"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    offenders += [f"{path.relative_to(REPO_ROOT)}: {name}" for name in private]
    assert offenders == []
