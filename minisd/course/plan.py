"""Which of a notebook's code cells the grader runs, and in what order (pure: starts nothing).

Whole-notebook mode runs every code cell in order, noting which cells define graded functions (the
sandbox remembers those functions right after their cell, so a later cell that rebinds the name
cannot replace the student's work). --exercises-only runs only the exercise cells plus the
statements of other cells they need (imports, defs, simple assignments that bind a name the
exercise code reads, found with `ast`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .build import cell_definitions, python_source


@dataclass
class Planned:
    source: str
    # 'cell 12 ("def attention(q, k...")' (1-based, all cells counted), or what it is
    label: str
    defines: list = field(default_factory=list)
    generated: bool = False


def _first_line(source: str) -> str:
    line = next(
        (l.strip() for l in source.split("\n") if l.strip() and not l.strip().startswith("#")), ""
    )
    return line if len(line) <= 40 else line[:37] + "..."


def _task_names_in(cell_source: str, task_names: set) -> list:
    defs = cell_definitions(cell_source)
    return [n for n in defs.functions if n in task_names]


@dataclass
class _Statement:
    source: str
    binds: set
    loads: set


def _names_loaded(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _statements(cell_source: str) -> list[_Statement]:
    """The top-level statements of a cell that bind names: imports (also inside try/if), def, class,
    and assignments to plain names, each with the names it binds and the names it reads."""
    try:
        tree = ast.parse(python_source(cell_source))
    except SyntaxError:
        return []
    found = []

    def visit(nodes, nested):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                binds = (
                    {"*"}
                    if any(a.name == "*" for a in node.names)
                    else {a.asname or a.name.split(".")[0] for a in node.names}
                )
                found.append(_Statement(ast.unparse(node), binds, set()))
            elif nested:
                for name in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, name, []) or [], True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.append(_Statement(ast.unparse(node), {node.name}, _names_loaded(node)))
            elif (
                isinstance(node, (ast.Assign, ast.AnnAssign))
                and getattr(node, "value", None) is not None
            ):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t for target in targets for t in ast.walk(target)]
                if all(isinstance(t, (ast.Name, ast.Tuple, ast.List)) for t in names):
                    binds = {t.id for t in names if isinstance(t, ast.Name)}
                    found.append(_Statement(ast.unparse(node), binds, _names_loaded(node.value)))
            elif isinstance(node, (ast.Try, ast.If, ast.With)):
                visit([node], True)

    visit(tree.body, False)
    return found


def _prelude(cells: list, exercise_sources: list, task_names: set) -> list[str]:
    """The statements of the non-exercise cells that the exercise cells need, directly or through
    each other: start from the names the exercise cells read and add every statement binding one of
    them, to a fixed point."""
    needed = set()
    for source in exercise_sources:
        try:
            needed |= _names_loaded(ast.parse(python_source(source)))
        except SyntaxError:
            continue
    statements = [
        st for source in cells for st in _statements(source) if not (st.binds & task_names)
    ]
    chosen = [False] * len(statements)
    changed = True
    while changed:
        changed = False
        for i, st in enumerate(statements):
            if not chosen[i] and (st.binds & needed or "*" in st.binds):
                chosen[i], changed = True, True
                needed |= st.loads
    return [st.source for st, keep in zip(statements, chosen) if keep]


def plan_cells(notebook, task_names: set, exercises_only: bool) -> list[Planned]:
    code_cells = [
        (i + 1, c)
        for i, c in enumerate(notebook.cells)
        if c.get("cell_type") == "code" and str(c.get("source", "")).strip()
    ]
    plan = []
    if not exercises_only:
        for index, cell in code_cells:
            defines = _task_names_in(cell.source, task_names)
            plan.append(
                Planned(cell.source, f'cell {index} ("{_first_line(cell.source)}")', defines)
            )
        return plan
    exercise = {index for index, cell in code_cells if _task_names_in(cell.source, task_names)}
    statements = _prelude(
        [c.source for i, c in code_cells if i not in exercise],
        [c.source for i, c in code_cells if i in exercise],
        task_names,
    )
    if statements:
        # each statement on its own, so one that fails (it needed state from a skipped cell) does
        # not stop the rest
        prelude = (
            "for __minisd_source in " + repr(statements) + ":\n"
            "    try:\n        exec(__minisd_source, globals())\n"
            "    except Exception:\n        pass\n"
            "del __minisd_source"
        )
        plan.append(Planned(prelude, "the notebook's imports and definitions", generated=True))
    for index, cell in code_cells:
        if index in exercise:
            defines = _task_names_in(cell.source, task_names)
            plan.append(
                Planned(cell.source, f'cell {index} ("{_first_line(cell.source)}")', defines)
            )
    return plan
