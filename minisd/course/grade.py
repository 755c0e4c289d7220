"""The autograder: run a student's notebook in a fresh kernel, then check each graded function in that kernel.

    python -m minisd.course grade chapters/01_attention/assignment.ipynb [--json] [--seed N] [--timeout S]
                                  [--extra-checks DIR] [--exercises-only] [--full-size] [--chapter NN]

1. Read the notebook (invalid JSON or not a notebook: reported, exit 1) and find the chapter (notebook metadata
   written by `build`, else the file or folder name NN_..., else --chapter).
2. Start a fresh kernel in the notebook's folder with MINISD_FAST=1 (unless --full-size) and run the notebook's code
   cells in order; a failing cell does not stop the rest. Right after each cell that defines a graded function, the
   function is remembered, so a later cell that rebinds the name cannot replace the student's work.
   --exercises-only runs only the exercise cells, plus the statements of other cells they need (imports, defs,
   simple assignments that bind a name the exercise code reads, found with `ast`): the same functions in seconds
   instead of a whole chapter (what tests/test_course.py uses).
3. For each task run the chapter's check (minisd/course/checks/chNN_*.py) in the same kernel, with a time limit
   (--timeout, per task). A check draws fresh random inputs (seeded from os.urandom, or --seed) and compares with
   minisd's own implementation computed right then. A task that loops forever is interrupted and reported 'timed
   out'; a kernel that dies is restarted and the notebook run again before the next task.
4. Report per task; exit 0 if every task passed, 1 otherwise, 2 for usage errors.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .build import cell_definitions, chapter_number, python_source

EXTRA_CHECKS_HELP = """\
## Hidden checks (instructors)

`grade --extra-checks DIR` also runs every `*.py` file in DIR (sorted by name) inside the grading kernel. A file
registers checks for graded tasks with a decorator; each check receives the same context as the built-in ones:

    # hidden/ch01_more.py
    import torch
    from minisd.attention import attention_math
    from minisd.course.checks import extra_check

    @extra_check("scaled_dot_product_attention")
    def long_sequences(ctx):
        q, k, v = (ctx.randn(1, 2, 300, 8) for _ in range(3))
        got = ctx.call(q, k, v)                       # the student's function (on copies of the inputs)
        ctx.expect_close(got, attention_math(q, k, v)[0], what="output for 300 tokens")

Each hidden check is reported as its own line (`task [file.py::function]`) and counts towards the score. One folder
may hold checks for every chapter: only those for the graded notebook's tasks run. A task name that no chapter has
(a typo) makes the file fail to load, reported as a grader error.
`ctx` offers `randn(*shape)`, `rand`, `randint(low, high, shape)`, `integer(low, high)`, `choice(options)`,
`call(*args, **kwargs)`, `expect_close(got, expected, what=, atol=, rtol=, mistakes={explanation: tensor})`,
`fail(message)` and `case(label)` (a context manager that prefixes failure messages). Compute expected values
from minisd at grading time; never write them into the file."""

class UsageError(Exception):
    """Bad command-line input: exit status 2."""


@dataclass
class Planned:
    source: str
    label: str                      # 'cell 12 ("def attention(q, k...")' (1-based, all cells counted), or what it is
    defines: list = field(default_factory=list)
    generated: bool = False


@dataclass
class Report:
    notebook: str
    chapter: Optional[str] = None
    seed: Optional[int] = None
    mode: str = "whole notebook"
    fast: bool = True
    tasks: list = field(default_factory=list)
    notebook_errors: list = field(default_factory=list)   # cells that raised (besides NotImplementedError)
    problems: list = field(default_factory=list)          # things that stopped grading or needed a restart
    seconds: float = 0.0
    fatal: bool = False                                   # the notebook could not even be read

    @property
    def passed(self) -> int:
        return sum(t["status"] == "passed" for t in self.tasks)

    @property
    def ok(self) -> bool:
        return bool(self.tasks) and self.passed == len(self.tasks) and not self.fatal

    def to_dict(self) -> dict:
        return {"notebook": self.notebook, "chapter": self.chapter, "seed": self.seed, "mode": self.mode,
                "fast": self.fast, "passed": self.passed, "total": len(self.tasks),
                "score": (self.passed / len(self.tasks)) if self.tasks else 0.0, "ok": self.ok,
                "tasks": self.tasks, "notebook_errors": self.notebook_errors, "problems": self.problems,
                "seconds": round(self.seconds, 2)}


# ------------------------------------------------------------------ planning which code runs

def _first_line(source: str) -> str:
    line = next((l.strip() for l in source.split("\n") if l.strip() and not l.strip().startswith("#")), "")
    return line if len(line) <= 40 else line[:37] + "..."


def _stash_source(names: list) -> str:
    return f"__import__('minisd.course.checks', fromlist=['stash']).stash(globals(), {names!r})"


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
    """The top-level statements of a cell that bind names: imports (also inside try/if), def, class, and assignments
    to plain names, each with the names it binds and the names it reads."""
    try:
        tree = ast.parse(python_source(cell_source))
    except SyntaxError:
        return []
    found = []

    def visit(nodes, nested):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                binds = {"*"} if any(a.name == "*" for a in node.names) else \
                    {a.asname or a.name.split(".")[0] for a in node.names}
                found.append(_Statement(ast.unparse(node), binds, set()))
            elif nested:
                for name in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, name, []) or [], True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.append(_Statement(ast.unparse(node), {node.name}, _names_loaded(node)))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(node, "value", None) is not None:
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
    """The statements of the non-exercise cells that the exercise cells need, directly or through each other:
    start from the names the exercise cells read and add every statement binding one of them, to a fixed point."""
    needed = set()
    for source in exercise_sources:
        try:
            needed |= _names_loaded(ast.parse(python_source(source)))
        except SyntaxError:
            continue
    statements = [st for source in cells for st in _statements(source) if not (st.binds & task_names)]
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
    code_cells = [(i + 1, c) for i, c in enumerate(notebook.cells)
                  if c.get("cell_type") == "code" and str(c.get("source", "")).strip()]
    plan = []
    if not exercises_only:
        for index, cell in code_cells:
            defines = _task_names_in(cell.source, task_names)
            plan.append(Planned(cell.source, f'cell {index} ("{_first_line(cell.source)}")', defines))
            if defines:
                plan.append(Planned(_stash_source(defines), "remember the graded functions", generated=True))
        return plan
    exercise = {index for index, cell in code_cells if _task_names_in(cell.source, task_names)}
    statements = _prelude([c.source for i, c in code_cells if i not in exercise],
                          [c.source for i, c in code_cells if i in exercise], task_names)
    if statements:
        # each statement on its own, so one that fails (it needed state from a skipped cell) does not stop the rest
        prelude = ("for __minisd_source in " + repr(statements) + ":\n"
                   "    try:\n        exec(__minisd_source, globals())\n"
                   "    except Exception:\n        pass\n"
                   "del __minisd_source")
        plan.append(Planned(prelude, "the notebook's imports and definitions", generated=True))
    for index, cell in code_cells:
        if index in exercise:
            defines = _task_names_in(cell.source, task_names)
            plan.append(Planned(cell.source, f'cell {index} ("{_first_line(cell.source)}")', defines))
            plan.append(Planned(_stash_source(defines), "remember the graded functions", generated=True))
    return plan


# ------------------------------------------------------------------ running

def _check_source(chapter: str, task: str, seed: int, timeout: float, extra_files: list) -> str:
    return (f"import minisd.course.checks as __minisd_checks\n"
            f"__minisd_results = __minisd_checks.run_task({chapter!r}, {task!r}, globals(), seed={seed}, "
            f"timeout={timeout!r}, extra_files={tuple(extra_files)!r})")


def _results_from(outputs: list) -> Optional[list]:
    from .checks import RESULT_MIME
    for output in outputs:
        data = output.get("data", {}) if output.get("output_type") in ("display_data", "execute_result") else {}
        if RESULT_MIME in data:
            value = data[RESULT_MIME]
            return json.loads(value) if isinstance(value, str) else list(value)
    return None


class Grader:
    """Grades notebooks, each in a fresh kernel.

    reuse_kernel=True (for test suites) keeps one kernel between notebooks and only clears its namespace
    (`%reset -f`, the remembered functions, the working folder): the same functions get graded, without paying
    the kernel start and `import torch` for every notebook. A kernel that died or hung is replaced either way.
    """

    def __init__(self, fast: bool = True, cell_timeout: Optional[float] = None, reuse_kernel: bool = False):
        from .kernel import Kernel
        if cell_timeout is None:  # fast mode runs a whole chapter in under a minute; full size takes up to 10
            cell_timeout = 120.0 if fast else 600.0
        if cell_timeout <= 0:
            raise UsageError("time limits must be positive")
        self.fast, self.cell_timeout, self.reuse_kernel = fast, cell_timeout, reuse_kernel
        self.kernel = Kernel(Path.cwd(), fast)
        self._fresh = False     # the kernel is running and nothing has run in it yet

    def close(self):
        self.kernel.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- kernel state -------------------------------------------------------------------------------------------
    def _new_kernel(self, folder: Path, report: Report) -> bool:
        from .kernel import KernelStartError
        self.kernel.cwd = folder
        try:
            self.kernel.restart()
        except KernelStartError as error:
            report.problems.append(str(error))
            return False
        return True

    def _clean_kernel(self, folder: Path, report: Report) -> bool:
        """A kernel in `folder` with an empty namespace: reset the running one if allowed, else start a new one."""
        if self.reuse_kernel and self.kernel.client is not None:
            reset = self.kernel.run(
                "get_ipython().run_line_magic('reset', '-f')\n"
                f"import os as __os; __os.chdir({str(folder)!r}); del __os\n"
                "__import__('minisd.course.checks', fromlist=['STASH']).STASH.clear()", 30)
            if not (reset.error or reset.died or reset.timed_out):
                return True
        return self._new_kernel(folder, report)

    def _run_plan(self, plan: list, skip: set, cell_errors: dict) -> Optional[int]:
        """Run the planned cells; the position of a cell that killed (or hung) the kernel, else None."""
        cell_errors.clear()
        for position, step in enumerate(plan):
            if position in skip:
                continue
            result = self.kernel.run(step.source, self.cell_timeout)
            if result.died:
                return position
            if result.timed_out:
                cell_errors[position] = result
                if not self.kernel.responsive():
                    return position
            elif result.error:
                cell_errors[position] = result
        return None

    def _prepare(self, folder: Path, plan: list, skip: set, cell_errors: dict, report: Report, fresh: bool) -> bool:
        """Get a kernel that has run the plan, skipping (and reporting) cells that kill or hang the kernel."""
        ok = self._clean_kernel(folder, report) if not fresh else self._new_kernel(folder, report)
        for _ in range(4):
            if not ok:
                return False
            died_at = self._run_plan(plan, skip, cell_errors)
            if died_at is None:
                return True
            skip.add(died_at)
            report.problems.append(f"the kernel died or hung while running {plan[died_at].label}; it was restarted "
                                   f"and the notebook run again without that cell")
            ok = self._new_kernel(folder, report)
        report.problems.append("the kernel died too often: stopped grading")
        return False

    # -- grading ------------------------------------------------------------------------------------------------
    def grade(self, path, *, seed: Optional[int] = None, timeout: float = 60.0, extra_dir: Optional[str] = None,
              exercises_only: bool = False, chapter: Optional[str] = None) -> Report:
        """Grade one notebook. Raises UsageError for bad arguments; every problem with the notebook is reported."""
        start = time.perf_counter()
        path = Path(path)
        report = Report(notebook=str(path), fast=self.fast,
                        mode="exercise cells only" if exercises_only else "whole notebook")
        extra_files = _extra_files(extra_dir)
        if timeout <= 0:
            raise UsageError("time limits must be positive")
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        notebook = _read_notebook(path, report)
        if notebook is None:
            report.seconds = time.perf_counter() - start
            return report

        number = chapter or chapter_number(path, notebook.get("metadata"))
        if number is None:
            raise UsageError(f"cannot tell which chapter {path} is: name it NN_name.ipynb or pass --chapter NN")
        from .checks import chapter_module
        try:
            module = chapter_module(number)
        except LookupError:
            raise UsageError(f"chapter {number} has no graded tasks (no minisd/course/checks/ch{number}_*.py)") \
                from None
        report.chapter = number
        report.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        tasks = list(module.TASKS)
        plan = plan_cells(notebook, {t.name for t in tasks}, exercises_only)

        folder = path.resolve().parent
        skip, cell_errors = set(), {}
        alive = self._prepare(folder, plan, skip, cell_errors, report, fresh=not self.reuse_kernel)
        restarts = 0
        for task in tasks:
            if not alive:
                report.tasks.append({"task": task.name, "check": "", "status": "not graded", "seconds": 0.0,
                                     "message": "grading stopped: " + (report.problems[-1] if report.problems else
                                                                       "the kernel is not running")})
                continue
            n_checks = 1 + len(extra_files)
            result = self.kernel.run(_check_source(number, task.name, report.seed, timeout, extra_files),
                                     timeout * n_checks + 5)  # the alarm in the kernel fires first
            report.tasks.extend(_task_outcomes(task.name, result, timeout * n_checks, plan, skip, cell_errors))
            if result.died or result.timed_out:  # a hung or interrupted check leaves the kernel in doubt: start over
                restarts += 1
                if restarts > 3:
                    report.problems.append("the kernel had to be restarted too often: stopped grading")
                    alive = False
                else:  # a new kernel, and the notebook run again, for the remaining tasks
                    alive = self._prepare(folder, plan, skip, cell_errors, report, fresh=True)

        if not exercises_only:
            for position, result in sorted(cell_errors.items()):
                step = plan[position]
                if step.generated or (result.error or {}).get("ename") == "NotImplementedError":
                    continue
                if result.timed_out:
                    report.notebook_errors.append(f"{step.label} ran past the {self.cell_timeout:g} s limit per "
                                                  f"cell and was interrupted")
                else:
                    report.notebook_errors.append(f"{step.label} raised {result.error_text}")
        report.seconds = time.perf_counter() - start
        return report


def _extra_files(extra_dir: Optional[str]) -> list[str]:
    if extra_dir is None:
        return []
    folder = Path(extra_dir)
    if not folder.is_dir():
        raise UsageError(f"--extra-checks {extra_dir}: not a folder")
    files = [str(p.resolve()) for p in sorted(folder.glob("*.py"))]
    if not files:
        raise UsageError(f"--extra-checks {extra_dir}: no .py files in it")
    return files


def _read_notebook(path: Path, report: Report):
    import nbformat
    try:
        notebook = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
        if not isinstance(notebook.get("cells"), list):
            raise ValueError("it has no list of cells")
        return notebook
    except Exception as error:  # noqa: BLE001 - invalid JSON, not a notebook, unreadable bytes, ...
        report.problems.append(f"{path} is not a readable Jupyter notebook ({type(error).__name__}: "
                               f"{' '.join(str(error).split())[:300]}). If you edited it by hand, restore it from "
                               f"the chapter folder or from Jupyter's checkpoint.")
        report.fatal = True
        return None


def _task_outcomes(name: str, result, limit: float, plan: list, skip: set, cell_errors: dict) -> list[dict]:
    outcomes = _results_from(result.outputs)
    if outcomes is not None:
        for outcome in outcomes:
            detail = _missing_detail(name, plan, skip, cell_errors) if outcome["status"] == "missing" else ""
            if detail:
                outcome["message"] = f"`{name}` is not defined because {detail}"
        return outcomes
    if result.died:
        return [{"task": name, "check": "", "status": "crashed", "seconds": result.seconds,
                 "message": "the kernel died while checking this task (out of memory? a crash in native code?)"}]
    if result.timed_out:
        return [{"task": name, "check": "", "status": "timed out", "seconds": result.seconds,
                 "message": f"did not finish within {limit:g} s and ignored the time limit (an endless loop that "
                            f"catches exceptions?)"}]
    return [{"task": name, "check": "", "status": "grader error", "seconds": result.seconds,
             "message": f"the check did not report a result: {result.error_text or 'no output'}"}]


def _missing_detail(task: str, plan: list, skip: set, cell_errors: dict) -> str:
    """Why a task is missing: the cell defining it raised before the def ran (e.g. a SyntaxError)."""
    for position, step in enumerate(plan):
        if task in step.defines and position in cell_errors:
            return f"{step.label} raised {cell_errors[position].error_text}"
        if task in step.defines and position in skip:
            return f"{step.label} was skipped (the kernel died while running it)"
    return ""


def grade(path, *, seed: Optional[int] = None, timeout: float = 60.0, cell_timeout: Optional[float] = None,
          extra_dir: Optional[str] = None, exercises_only: bool = False, fast: bool = True,
          chapter: Optional[str] = None) -> Report:
    """Grade one notebook in a fresh kernel (see the module docstring)."""
    with Grader(fast=fast, cell_timeout=cell_timeout) as grader:
        return grader.grade(path, seed=seed, timeout=timeout, extra_dir=extra_dir, exercises_only=exercises_only,
                            chapter=chapter)


# ------------------------------------------------------------------ reporting

def format_report(report: Report) -> str:
    lines = []
    where = f"chapter {report.chapter}" if report.chapter else "unknown chapter"
    settings = [where]
    if report.seed is not None:
        settings.append(f"seed {report.seed}")
    settings.append(report.mode)
    settings.append("MINISD_FAST=1" if report.fast else "full size")
    lines.append(f"Grading {report.notebook} ({', '.join(settings)})")
    width = max([len(t["task"] + (f" [{t['check']}]" if t.get("check") else "")) for t in report.tasks] + [10])
    for t in report.tasks:
        name = t["task"] + (f" [{t['check']}]" if t.get("check") else "")
        mark = "✔" if t["status"] == "passed" else "✘"
        lines.append(f"  {mark} {name:<{width}}  {t['status']}" + (f": {t['message']}" if t.get("message") else ""))
    for note in report.notebook_errors[:8]:
        lines.append(f"  note: {note}")
    if len(report.notebook_errors) > 8:
        lines.append(f"  note: ... and {len(report.notebook_errors) - 8} more cells raised errors")
    for problem in report.problems:
        lines.append(f"  problem: {problem}")
    if report.tasks:
        lines.append(f"Score: {report.passed}/{len(report.tasks)} passed ({report.seconds:.0f} s)"
                     + ("" if report.ok or report.seed is None else f"; repeat these inputs with --seed {report.seed}"))
    else:
        lines.append("Not graded.")
    return "\n".join(lines)


def main(args) -> int:
    try:
        report = grade(args.notebook, seed=args.seed, timeout=args.timeout, cell_timeout=args.cell_timeout,
                       extra_dir=args.extra_checks, exercises_only=args.exercises_only, fast=not args.full_size,
                       chapter=args.chapter)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the grader reports, it does not crash
        report = Report(notebook=str(args.notebook), fatal=True,
                        problems=[f"internal grader error, please report it: {type(error).__name__}: {error}"])
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
