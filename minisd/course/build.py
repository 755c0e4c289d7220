"""notebooks/NN_name.ipynb (the teacher's version, with solutions) -> chapters/NN_name/ (students').

For every notebook this writes
    chapters/NN_name/assignment.ipynb   the notebook with outputs cleared, every solution region
                                        replaced by a stub, and cells tagged `solution-only` removed
    chapters/NN_name/README.md          learning goals, the graded tasks (name, signature, what to
                                        compute, allowed calls), how to check your work
and chapters/README.md, the index. Same input, byte-identical output; `--check` compares instead of
writing.

A solution region sits inside a code cell:

    def scaled_dot_product_attention(q, k, v, mask=None):
        \"\"\"docstring: stays in the student version\"\"\"
        ### BEGIN SOLUTION
        # hint: scores q·kᵀ/√d, mask, softmax over the keys, weight the values
        ...
        ### END SOLUTION

and becomes `raise NotImplementedError("scores q·kᵀ/√d, ...")` at the indentation of the
`### BEGIN SOLUTION` line. The optional first line `# hint: ...` gives the message; without it the
message names the function to write.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
HINT_PREFIX = "# hint:"
SOLUTION_ONLY_TAG = "solution-only"  # a cell with this tag is left out of the student version
HEADER_CELL_ID = "minisd-assignment-header"
GENERATOR = "python -m minisd.course build"
NOTEBOOK_NAME = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")


class BuildError(Exception):
    """A notebook breaks the conventions (unclosed region, task missing, ...): the message says
    where."""


# ------------------------------------------------------------------ solution regions


@dataclass
class Region:
    begin: int  # line index of `### BEGIN SOLUTION`
    end: int  # line index of `### END SOLUTION`
    indent: str
    hint: Optional[str]


def find_regions(source: str, where: str) -> list[Region]:
    lines = source.split("\n")
    regions, open_at = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == BEGIN:
            if open_at is not None:
                raise BuildError(
                    f"{where}, line {i + 1}: '{BEGIN}' inside another solution region "
                    f"(opened on line {open_at + 1})"
                )
            open_at = i
        elif stripped == END:
            if open_at is None:
                raise BuildError(f"{where}, line {i + 1}: '{END}' without a '{BEGIN}' before it")
            indent = lines[open_at][: len(lines[open_at]) - len(lines[open_at].lstrip())]
            first = next((lines[j].strip() for j in range(open_at + 1, i) if lines[j].strip()), "")
            hint = (
                first[len(HINT_PREFIX) :].strip() if first.lower().startswith(HINT_PREFIX) else None
            )
            regions.append(Region(open_at, i, indent, hint or None))
            open_at = None
        elif BEGIN in line or END in line:
            raise BuildError(
                f"{where}, line {i + 1}: the solution markers must stand alone on their line: "
                f"{line!r}"
            )
    if open_at is not None:
        raise BuildError(f"{where}, line {open_at + 1}: '{BEGIN}' is never closed by '{END}'")
    return regions


def _enclosing_function(lines: list[str], line_index: int, indent: str) -> Optional[str]:
    """Name of the innermost `def` above `line_index` that is indented less than the region."""
    for j in range(line_index - 1, -1, -1):
        match = re.match(r"^(\s*)(?:async\s+)?def\s+([A-Za-z_]\w*)", lines[j])
        if match and len(match.group(1)) < len(indent):
            return match.group(2)
    return None


def _string_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def strip_solutions(source: str, where: str) -> str:
    """Replace every solution region of a cell's source by `raise NotImplementedError(hint)`."""
    regions = find_regions(source, where)
    if not regions:
        return source
    lines = source.split("\n")
    out, previous = [], 0
    for region in regions:
        out.extend(lines[previous : region.begin])
        function = _enclosing_function(lines, region.begin, region.indent)
        message = region.hint or (
            f"write the body of {function}() (see its docstring)" if function else "your code here"
        )
        out.append(f"{region.indent}raise NotImplementedError({_string_literal(message)})")
        previous = region.end + 1
    out.extend(lines[previous:])
    return "\n".join(out)


def solution_lines(source: str, where: str = "cell") -> list[str]:
    """The lines strictly inside the solution regions (hint lines included)."""
    lines = source.split("\n")
    return [line for r in find_regions(source, where) for line in lines[r.begin + 1 : r.end]]


# ------------------------------------------------------------------ reading cells as Python


def python_source(cell_source: str) -> str:
    """A code cell's source with IPython syntax (%magics, !shell) turned into plain Python, for
    `ast`."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(cell_source)
    except Exception:  # IPython missing or the transform failed: parse as is
        return cell_source


@dataclass
class CellDefs:
    """What a code cell defines at top level (parsed with ast; `syntax_error` when it does not
    parse)."""

    functions: dict = field(default_factory=dict)  # name -> (signature text, docstring)
    imports: list = field(default_factory=list)  # source of each top-level import statement
    # source of each top-level def/class (with decorators)
    definitions: list = field(default_factory=list)
    syntax_error: Optional[str] = None


def cell_definitions(cell_source: str) -> CellDefs:
    source = python_source(cell_source)
    result = CellDefs()
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        result.syntax_error = f"SyntaxError: {error.msg} (line {error.lineno})"
        for match in re.finditer(r"^def\s+([A-Za-z_]\w*)\s*\(", source, re.M):
            result.functions[match.group(1)] = (None, None)
        return result
    lines = source.split("\n")
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[start - 1 : node.end_lineno])
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            result.imports.append(text)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            result.definitions.append((node.name, text))
            if not isinstance(node, ast.ClassDef):
                result.functions[node.name] = (signature_text(node), ast.get_docstring(node))
            else:  # a class task: its contract is the signature of __init__ without `self`
                init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                            None)
                signature = signature_text(init) if init else "()"
                signature = re.sub(r"^\(self(, )?", "(", signature)
                result.functions[node.name] = (signature, ast.get_docstring(node))
    return result


def signature_text(node: ast.FunctionDef) -> str:
    """'(q, k, v, mask=None)' from a def node (annotations dropped)."""
    args = node.args
    parts = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        parts.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
        if args.posonlyargs and i == len(args.posonlyargs) - 1:
            parts.append("/")
    if args.vararg:
        parts.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
    if args.kwarg:
        parts.append("**" + args.kwarg.arg)
    return "(" + ", ".join(parts) + ")"


# ------------------------------------------------------------------ chapters


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def chapter_number(path: Path, metadata: Optional[dict] = None) -> Optional[str]:
    """'01' for notebooks/01_attention.ipynb, chapters/01_attention/assignment.ipynb, or a notebook
    built from it."""
    chapter = ((metadata or {}).get("minisd") or {}).get("chapter")
    if isinstance(chapter, str) and re.fullmatch(r"\d\d", chapter):
        return chapter
    for name in (path.name, path.parent.name + ".ipynb"):
        match = re.match(r"^(\d\d)_", name)
        if match:
            return match.group(1)
    return None


def chapter_checks(number: str):
    """The checks module of chapter `number` (minisd/course/checks/chNN_*.py), or None."""
    import importlib

    folder = Path(__file__).parent / "checks"
    matches = sorted(folder.glob(f"ch{number}_*.py"))
    if not matches:
        return None
    return importlib.import_module(f"minisd.course.checks.{matches[0].stem}")


def _clean_metadata(metadata: dict, keep: tuple) -> dict:
    return {k: metadata[k] for k in keep if k in metadata}


def student_notebook(notebook, source_name: str, number: str, chapter_dir: str, checks=None):
    """The student version of a notebook (a new nbformat node; the input is not modified): solution regions
    stubbed, `solution-only` cells left out, `answer` cells replaced (answers.py), and the docstrings of graded
    functions replaced by the task's contract."""
    import nbformat

    from . import answers
    contracts = {t.name: t.summary for t in (checks.TASKS if checks else [])}

    nb = nbformat.v4.new_notebook()
    nb.nbformat, nb.nbformat_minor = 4, max(5, notebook.get("nbformat_minor", 5))
    # language_info is filled in by whoever executed the notebook last (Python version, ...): keep
    # only the language, so re-executing the notebooks does not change the student version
    nb.metadata = _clean_metadata(notebook.metadata, ("kernelspec",))
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["minisd"] = {
        "chapter": number,
        "generated_from": source_name,
        "generator": GENERATOR,
    }
    header = nbformat.v4.new_markdown_cell(
        HEADER_TEXT.format(source=source_name, chapter=int(number), chapter_dir=chapter_dir)
    )
    header.id = HEADER_CELL_ID
    cells = [header]
    for index, cell in enumerate(notebook.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if SOLUTION_ONLY_TAG in tags:
            continue
        where = f"{source_name}, cell {index + 1}"
        if answers.is_answer_cell(cell):
            kind, text = answers.replacement_for(cell)
            new = nbformat.v4.new_code_cell(text) if kind == "code" else nbformat.v4.new_markdown_cell(text)
            new.id = cell.get("id") or f"cell-{index}"
            cells.append(new)
            continue
        if cell.cell_type == "code":
            stubbed = strip_solutions(cell.source, where)
            if BEGIN in cell.source:
                stubbed = answers.replace_docstrings(stubbed, contracts)
            new = nbformat.v4.new_code_cell(stubbed)
        elif cell.cell_type == "markdown":
            if find_regions(cell.source, where):
                raise BuildError(
                    f"{where}: solution regions belong in code cells (tag a markdown cell "
                    f"'{SOLUTION_ONLY_TAG}' to leave it out)"
                )
            new = nbformat.v4.new_markdown_cell(cell.source)
            if cell.get("attachments"):
                new.attachments = cell.attachments
        else:
            new = nbformat.v4.new_raw_cell(cell.source)
        new.id = cell.get("id") or f"cell-{index}"
        new.metadata = _clean_metadata(cell.get("metadata", {}), ("tags",))
        cells.append(new)
    nb.cells = cells
    return nb


HEADER_TEXT = """\
> **Chapter {chapter} assignment.** Fill in the functions that raise `NotImplementedError` (look for the graded
> exercises near the end), then check your work from the repository root:
> `python -m minisd.course grade chapters/{chapter_dir}/assignment.ipynb`
>
> *Generated from `{source}` by `python -m minisd.course build`. Instructors: do not edit this copy; edit the notebook
> and rebuild.*"""


def _readme(number: str, title: str, source_name: str, chapter_dir: str, checks, plan: list,
            exercises: list = ()) -> str:
    lines = [f"<!-- Generated from {source_name} by `{GENERATOR}`. Do not edit: edit the notebook or "
             f"minisd/course/checks/ and rebuild. -->", "", f"# Chapter {int(number)}: {title}", ""]
    goals = getattr(checks, "GOALS", None) if checks else None
    if goals:
        lines += ["## Learning goals", ""] + [f"- {g}" for g in goals] + [""]
    prerequisites = getattr(checks, "PREREQUISITES", None) if checks else None
    if prerequisites:
        lines += ["## Prerequisites", ""] + [f"- **{k}**: {v}" for k, v in prerequisites.items()] + [""]
    if plan:
        lines += ["## What the chapter does", ""] + [f"{i}. {item}" for i, item in enumerate(plan, 1)] + [""]
    tasks = list(checks.TASKS) if checks else []
    reading = getattr(checks, "READING_MINUTES", None) if checks else None
    if reading or tasks:
        work = sum(t.minutes for t in tasks)
        lines += ["## Estimated time", "", f"About {reading or 0} minutes to read and run the chapter, and "
                  f"{work} minutes for the graded tasks, plus the thinking exercises you are given.", ""]
    lines += ["## Your assignment", "",
              f"Open [`assignment.ipynb`](assignment.ipynb), read it top to bottom, and run every cell. Each graded "
              f"exercise is a function whose body raises `NotImplementedError`: replace that line with your code. "
              f"Keep the function's name and signature: the grader calls it by name.", ""]
    if tasks:
        lines += ["## Graded tasks", "", "| task | level | minutes |", "|---|---|---|"]
        lines += [f"| `{t.name}` | {t.level} | {t.minutes} |" for t in tasks] + [""]
        for task in tasks:
            lines += [f"### `{task.name}{task.signature}` ({task.level})", "", textwrap.dedent(task.summary).strip(),
                      ""]
            allowed = textwrap.dedent(task.allowed).strip() or "torch and plain Python."
            if task.forbidden:
                allowed += (
                    " A function that calls what the task asks you to write fails the task with a "
                    "message saying so."
                )
            lines += ["Allowed calls: " + allowed, ""]
            if task.checked:
                lines += ["The grader checks: " + textwrap.dedent(task.checked).strip(), ""]
    else:
        lines += ["This chapter has no graded tasks: its exercises are for practice.", ""]
    if exercises:
        lines += ["## Thinking exercises", ""]
        lines += ["Not graded automatically; your instructor may ask for written answers.", ""]
        lines += [f"- {ex.label}: {ex.title}" for ex in exercises] + [""]
    lines += [
        "## Check your work",
        "",
        "From the repository root:",
        "",
        "```",
        f"python -m minisd.course grade chapters/{chapter_dir}/assignment.ipynb",
        "```",
        "",
        "The grader runs your notebook in a fresh sandbox (as if you had restarted the kernel and "
        "run every "
        "cell, in an empty folder holding only the notebook, without network), then "
        "calls each graded function on random inputs of random shapes and compares the results "
        "with minisd's own "
        "implementation. For every task it says *passed*, *failed* (with the largest error and "
        "where it is), "
        "*not attempted* (still raises `NotImplementedError`), *error* (your function raised), "
        "*missing* (not "
        "defined), *wrong signature*, *timed out*, or *crashed*. The inputs change on every run; "
        "`--seed N` repeats a run. "
        "`--json` prints a machine-readable report. The exit status is 0 when every task passes. "
        "`--exercises-only` skips the rest of the chapter and runs just your exercise cells (and "
        "the imports "
        "they need): a check in seconds while you work. Save the notebook first: the grader reads "
        "the file.",
        "",
    ]
    return "\n".join(lines)


INDEX_TEXT = """\
<!-- Generated by `{generator}`. Do not edit: edit notebooks/ or minisd/course/ and rebuild. -->

# minisd chapters: assignments

Each folder holds one chapter's student notebook (`assignment.ipynb`: the chapter with the graded exercises left for
you to write) and a README with the learning goals and the tasks. The complete chapters, with solutions and outputs,
are in `notebooks/`.

| Chapter | | Graded tasks |
|---|---|---|
{rows}

## Grading

    python -m minisd.course grade chapters/01_attention/assignment.ipynb [--json] [--seed N] [--timeout S]

runs the notebook in a fresh kernel with `MINISD_FAST=1` (small sizes; `--full-size` turns it off), then checks
every graded function on random inputs against minisd's own implementation. Exit status: 0 all tasks passed,
1 otherwise, 2 usage error. `--exercises-only` runs only the imports, definitions and exercise cells (seconds instead
of a whole chapter).

## Numeric questions and the open-ended project

`python -m minisd.course questions NN --student ID` prints your numeric questions for chapter NN (their inputs are
drawn from your student id); `--answers FILE.json` checks your answers. The project, training the best tiny model
you can in a fixed CPU budget, is described in `minisd/course/project.py` and scored with
`python -m minisd.course project MODEL.safetensors --student ID` (JSON for the class leaderboard).

{extra}
"""


def _index(entries: list[tuple[str, str, list]]) -> str:
    from .checks import EXTRA_CHECKS_HELP

    rows = "\n".join(
        f"| [{d}]({d}/README.md) | {title} | {', '.join(f'`{t}`' for t in tasks) or '(none)'} |"
        for d, title, tasks in entries
    )
    text = INDEX_TEXT.format(
        generator=GENERATOR, rows=rows, extra=EXTRA_CHECKS_HELP.strip() + "\n"
    )
    return text.rstrip() + "\n"


def verify_tasks(notebook, source_name: str, checks) -> dict:
    """Every graded task must be defined in a code cell with a solution region, with the contracted
    signature."""
    found = {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or BEGIN not in cell.source:
            continue
        defs = cell_definitions(cell.source)
        if defs.syntax_error:
            raise BuildError(f"{source_name}, cell {index + 1}: {defs.syntax_error}")
        for name, (signature, _) in defs.functions.items():
            found[name] = (index, signature)
    problems = []
    for task in checks.TASKS if checks else []:
        if task.name not in found:
            problems.append(
                f"graded task {task.name}{task.signature} is not defined in a cell with a solution "
                "region"
            )
        elif found[task.name][1] != task.signature:
            problems.append(
                f"cell {found[task.name][0] + 1} defines {task.name}{found[task.name][1]}, "
                f"the task list says {task.name}{task.signature}"
            )
    if problems:
        raise BuildError(f"{source_name}: " + "; ".join(problems))
    return found


def chapter_plan(notebook) -> list[str]:
    """The numbered list of the notebook's introduction ("In this chapter you will 1. … 2. …"), one
    item per entry, continuation lines joined; [] if the introduction (markdown before the first
    code cell) has none."""
    items: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            break
        if cell.cell_type != "markdown":
            continue
        in_list = False
        for line in cell.source.split("\n"):
            match = re.match(r"^\d+\.\s+(.*)$", line)
            if match:
                items.append(match.group(1).strip())
                in_list = True
            elif in_list and line.startswith((" ", "\t")) and line.strip():
                items[-1] += " " + line.strip()
            else:
                in_list = False
        if items:
            return items
    return items


def title_of(notebook, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.split("\n"):
                if line.startswith("# "):
                    return (
                        re.sub(r"^(Chapter\s+)?\d+\s*[:.·—-]?\s*", "", line[2:].strip()) or fallback
                    )
    return fallback


RELATIVE_TO_NOTEBOOKS = re.compile(r"""Path\(\s*["']\.\.["']\s*\)|["']\.\./""")


def working_folder_problems(notebook, source_name: str) -> list[str]:
    """Code that reaches files through '..': it works from notebooks/ but not from
    chapters/NN_name/, one level deeper, where students run the same cells."""
    return [
        f"{source_name}, cell {i + 1}: {line.strip()!r} reads a path relative to notebooks/, which "
        "breaks in "
        f"chapters/; use minisd.course.helpers.repo_root() / 'tests' / ... instead"
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for line in cell.source.split("\n")
        if RELATIVE_TO_NOTEBOOKS.search(line)
    ]


def build_outputs(root: Path, warnings: Optional[list] = None) -> dict[Path, str]:
    """Every file chapters/ should contain -> its text."""
    import nbformat

    notebooks = sorted(
        p for p in (root / "notebooks").glob("*.ipynb") if NOTEBOOK_NAME.match(p.name)
    )
    outputs, entries = {}, []
    for path in notebooks:
        number, slug = NOTEBOOK_NAME.match(path.name).groups()
        chapter_dir = path.stem
        source_name = f"notebooks/{path.name}"
        try:
            notebook = nbformat.read(path, as_version=4)
        except Exception as error:
            raise BuildError(f"{source_name} cannot be read as a notebook: {error}") from None
        checks = chapter_checks(number)
        verify_tasks(notebook, source_name, checks)
        if warnings is not None:
            warnings.extend(working_folder_problems(notebook, source_name))
        student = student_notebook(notebook, source_name, number, chapter_dir, checks)
        outputs[root / "chapters" / chapter_dir / "assignment.ipynb"] = nbformat.writes(student) + "\n"
        title = title_of(notebook, getattr(checks, "TITLE", slug.replace("_", " ")))
        from .exercises import thinking_exercises
        outputs[root / "chapters" / chapter_dir / "README.md"] = _readme(number, title, source_name, chapter_dir,
                                                                          checks, chapter_plan(notebook),
                                                                          thinking_exercises(notebook))
        entries.append((chapter_dir, title, [t.name for t in (checks.TASKS if checks else [])]))
    if entries:
        outputs[root / "chapters" / "README.md"] = _index(entries)
    return outputs


def existing_outputs(root: Path) -> set[Path]:
    folder = root / "chapters"
    if not folder.is_dir():
        return set()
    return {p for p in folder.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts}


def build(root: Optional[Path] = None, check: bool = False, out=sys.stdout) -> int:
    """Write chapters/ (or, with check=True, report whether it is up to date). Returns the exit
    status."""
    root = Path(root) if root is not None else repo_root()
    warnings: list[str] = []
    try:
        outputs = build_outputs(root, warnings)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    generated_names = {"assignment.ipynb", "README.md"}
    stale = sorted(p for p in existing_outputs(root) - set(outputs) if p.name in generated_names)
    if check:
        differing = [
            p
            for p, text in outputs.items()
            if not p.is_file() or p.read_text(encoding="utf-8") != text
        ]
        for path in differing:
            rel = path.relative_to(root)
            if path.is_file():
                diff = list(
                    difflib.unified_diff(
                        path.read_text(encoding="utf-8").splitlines(),
                        outputs[path].splitlines(),
                        f"{rel} (committed)",
                        f"{rel} (built)",
                        lineterm="",
                        n=1,
                    )
                )
                print(f"{rel} is out of date:\n" + "\n".join(diff[:20]), file=out)
            else:
                print(f"{rel} is missing", file=out)
        for path in stale:
            print(f"{path.relative_to(root)} has no notebook in notebooks/ any more", file=out)
        if differing or stale:
            print("chapters/ is out of date: run `python -m minisd.course build`", file=out)
            return 1
        print(f"chapters/ is up to date ({len(outputs)} files)", file=out)
        return 0
    written = 0
    for path, text in outputs.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written += 1
    for path in stale:
        path.unlink()
        if path.parent != root / "chapters" and not any(path.parent.iterdir()):
            path.parent.rmdir()
    print(f"chapters/: {len(outputs)} files, {written} written, {len(stale)} removed", file=out)
    return 0
