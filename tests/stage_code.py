"""Which source files a pipeline stage runs, read from the code (not from dvc.yaml).

From the stage function in ``adps/stages.py``: the functions of that module it calls (decorators
included) and the ``adps`` modules they refer to, then every ``adps`` module those import (at any
depth, module level or inside functions). ``adps/stages.py`` itself is walked function by function:
it imports what every stage needs, and a stage must not depend on the others' code. The thin CLI
(``adps/cli.py``) and the Prefect tasks only call the stage function, so they are not part of it. The
code registration bundles into the model is ``adps.tracking.served_code()``, checked separately.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES_MODULE = "adps.stages"


def module_file(module: str) -> Path | None:
    base = REPO_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(node: ast.AST) -> dict[str, str]:
    """Name bound -> ``adps`` module, for every import anywhere under ``node``."""
    names = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.split(".")[0] == "adps":
            for alias in sub.names:
                full = f"{sub.module}.{alias.name}"
                names[alias.asname or alias.name] = full if module_file(full) else sub.module
        elif isinstance(sub, ast.Import):
            names.update({a.asname or a.name: a.name for a in sub.names if a.name.split(".")[0] == "adps"})
    return names


def module_closure(modules: set[str]) -> set[str]:
    """The modules and every ``adps`` module they import, transitively (``adps.stages`` excepted)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module == STAGES_MODULE or (path := module_file(module)) is None:
            continue
        seen.add(module)
        todo += imported_modules(ast.parse(path.read_text())).values()
    return seen


def stage_modules(stage: str) -> set[str]:
    """Every ``adps`` module the stage function ``adps.stages.<stage>`` runs."""
    tree = ast.parse(module_file(STAGES_MODULE).read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top_level = imported_modules(ast.Module([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], []))
    modules, seen, todo = set(), set(), [stage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        modules |= set(imported_modules(functions[name]).values())
        for sub in ast.walk(functions[name]):
            if isinstance(sub, ast.Name) and sub.id in functions:
                todo.append(sub.id)
            elif isinstance(sub, ast.Name) and sub.id in top_level:
                modules.add(top_level[sub.id])
    return module_closure(modules) | {STAGES_MODULE}


def stage_files(stage: str) -> set[str]:
    """The source files of :func:`stage_modules`, relative to the repository root."""
    return {str(module_file(m).relative_to(REPO_ROOT)) for m in stage_modules(stage) if module_file(m)}
