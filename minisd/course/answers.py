"""What the student version leaves out besides the solution regions: worked cells and docstrings
that give a graded task's answer away, and the detector that proves nothing of a solution is left.

Worked cells. A chapter often computes, a few cells above an exercise, the very thing the exercise
asks for. Such a cell is tagged `answer` in the instructor's notebook (cell metadata `"tags":
["answer"]`). The student version puts in its place either

- `metadata.minisd.student`: a replacement code cell (a string), typically the same result taken
  from the package (`O, A = attention_math(...)`) so that the cells after it still run, with a
  comment saying what was removed; or
- a markdown note: `metadata.minisd.hint` if given, else a generic line saying a worked answer stood
  here.

Docstrings. The docstring of every graded function or class is replaced by the task's contract
(`Task.summary`), which states what to compute and never how: the instructor's docstring may give
the full formula.

The detector. A solution's *core expressions* are the expressions inside its solution regions with
at least `MIN_NODES` AST nodes, normalised: every variable name becomes `_`, attribute names,
constants, operators and keyword names stay. `leaks(solution, cells)` lists the core expressions
that also occur, normalised, anywhere in the given code cells: `S.softmax(dim=-1) @ V` in a worked
cell matches `scores.softmax(dim=-1) @ v` in a solution.
"""

from __future__ import annotations

import ast
import copy
import textwrap
from typing import Iterable, Optional

ANSWER_TAG = "answer"
MIN_NODES = 6  # smaller expressions (`x.shape[0]`, `a.sqrt()`) are vocabulary, not answers
DEFAULT_NOTE = (
    "*A worked cell of the instructor's version stands here: it computes the answer to one of the "
    "graded exercises below, so your version leaves it out.*"
)


# ------------------------------------------------------------------ worked cells


def is_answer_cell(cell) -> bool:
    return ANSWER_TAG in cell.get("metadata", {}).get("tags", [])


def replacement_for(cell):
    """(cell_type, source) that the student version shows instead of an `answer` cell."""
    extra = cell.get("metadata", {}).get("minisd", {}) or {}
    student = extra.get("student")
    if student:
        return "code", "".join(student) if isinstance(student, list) else str(student)
    hint = extra.get("hint")
    return "markdown", f"*{hint}*" if hint else DEFAULT_NOTE


# ------------------------------------------------------------------ docstrings of graded functions


def replace_docstrings(source: str, contracts: dict) -> str:
    """The cell's source with the docstring of each top-level def/class named in `contracts`
    replaced by contracts[name] (wrapped to 100 columns, at the docstring's indentation). A
    definition without a docstring gets one. Sources that do not parse are returned unchanged (the
    build reports them elsewhere).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.split("\n")
    edits = []  # (first line index, last line index + 1, new lines), applied bottom-up
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name not in contracts:
            continue
        first = node.body[0]
        indent = " " * first.col_offset
        text = _docstring_lines(contracts[node.name], indent)
        has_doc = (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        )
        if has_doc:
            edits.append((first.lineno - 1, first.end_lineno, text))
        else:
            edits.append((first.lineno - 1, first.lineno - 1, text))
    for start, stop, text in sorted(edits, reverse=True):
        lines[start:stop] = text
    return "\n".join(lines)


def _docstring_lines(contract: str, indent: str) -> list[str]:
    body = " ".join(textwrap.dedent(contract).split()).replace('"""', "'''").replace("\\", "\\\\")
    wrapped = textwrap.wrap(body, width=100 - len(indent), break_long_words=False)
    if len(wrapped) == 1 and len(wrapped[0]) + 6 + len(indent) <= 100:
        return [f'{indent}"""{wrapped[0]}"""']
    return (
        [f'{indent}"""{wrapped[0]}']
        + [f"{indent}{line}" for line in wrapped[1:]]
        + [f'{indent}"""']
    )


# ------------------------------------------------------------------ the leak detector


class _Anonymise(ast.NodeTransformer):
    """Every variable name becomes `_`; attribute names, constants, operators and keywords stay."""

    def visit_Name(self, node):
        return ast.Name(id="_", ctx=ast.Load())

    def visit_arg(self, node):
        return ast.arg(arg="_")


def _normalised(node: ast.AST) -> str:
    return ast.dump(
        _Anonymise().visit(_copy(node)), annotate_fields=False, include_attributes=False
    )


def _copy(node):
    return copy.deepcopy(node)


def _size(node: ast.AST) -> int:
    return sum(
        1
        for n in ast.walk(node)
        if not isinstance(n, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop))
    )


def expressions(code: str, min_nodes: int = MIN_NODES) -> dict[str, str]:
    """normalised form -> source text, for every expression of `code` with at least `min_nodes`
    nodes.
    """
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return {}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.expr) and _size(node) >= min_nodes:
            found.setdefault(_normalised(node), ast.unparse(node))
    return found


def solution_code(source: str, regions) -> str:
    """The code inside a cell's solution regions, each region dedented, joined (parses as a
    module)."""
    lines = source.split("\n")
    parts = [textwrap.dedent("\n".join(lines[r.begin + 1 : r.end])) for r in regions]
    return "\n".join(parts)


def leaks(solution: str, cells: Iterable[str], ignore: Optional[set] = None) -> list[str]:
    """Core expressions of `solution` (source text) that occur, normalised, in any of `cells` (code
    sources).
    """
    core = expressions(solution)
    shown: set = set()
    for cell in cells:
        shown |= set(expressions(cell))
    return sorted(core[key] for key in core.keys() & shown if key not in (ignore or set()))
