"""The autograder: run a notebook in a disposable sandbox, check each function from outside.

    python -m minisd.course grade chapters/01_attention/assignment.ipynb [--json] [--seed N]
        [--timeout S] [--extra-checks DIR] [--exercises-only] [--full-size] [--chapter NN]
    python -m minisd.course grade submissions/ --chapter 01 --csv grades.csv --jobs 2   (batch.py)

1. Read the notebook (invalid JSON or not a notebook: reported, exit 1). The chapter comes from
   --chapter or the file/folder name (NN_...), never from the notebook's metadata, which the
   student controls.
2. Start a sandbox (sandbox.py: bubblewrap on Linux, else a plain separate process, named in the
   report) and run the notebook's code cells there in order (plan.py; --exercises-only: just the
   exercise cells and what they need), each with a time limit, the whole notebook with a deadline.
   A failing cell does not stop the rest; a cell that kills or hangs the sandbox is skipped in a
   fresh sandbox.
3. For each task run the chapter's check (minisd/course/checks/chNN_*.py) and the instructors'
   hidden checks HERE, in the grader's process: a check draws inputs, `ctx.call` sends them to the
   sandbox, which runs the student's function and sends back plain values (remote.py, wire.py);
   the check compares them with minisd's answer. The grader knows which checks it runs, so a check
   whose sandbox dies, hangs or answers garbage is one failed line, never a missing one.
4. Report per task; exit 0 if every task passed, 1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .build import chapter_number
from .plan import plan_cells
from .sandbox import Isolation, Limits, Sandbox, SandboxError

# the help text lives beside the `extra_check` decorator it documents
from .checks import EXTRA_CHECKS_HELP  # noqa: E402,F401


# a cell's reply may lag its own alarm this long (a busy machine) before the sandbox is killed
GRACE_SECONDS = 5.0


class UsageError(Exception):
    """Bad command-line input: exit status 2."""


@dataclass
class Report:
    notebook: str
    chapter: Optional[str] = None
    seed: Optional[int] = None
    mode: str = "whole notebook"
    fast: bool = True
    isolation: str = ""
    tasks: list = field(default_factory=list)
    # cells that raised (besides NotImplementedError)
    notebook_errors: list = field(default_factory=list)
    # things that stopped grading or needed a restart
    problems: list = field(default_factory=list)
    seconds: float = 0.0
    fatal: bool = False  # the notebook could not even be read

    @property
    def passed(self) -> int:
        return sum(t["status"] == "passed" for t in self.tasks)

    @property
    def ok(self) -> bool:
        return bool(self.tasks) and self.passed == len(self.tasks) and not self.fatal

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "chapter": self.chapter,
            "seed": self.seed,
            "mode": self.mode,
            "fast": self.fast,
            "isolation": self.isolation,
            "passed": self.passed,
            "total": len(self.tasks),
            "score": (self.passed / len(self.tasks)) if self.tasks else 0.0,
            "ok": self.ok,
            "tasks": self.tasks,
            "notebook_errors": self.notebook_errors,
            "problems": self.problems,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _Run:
    """One grading in progress: the notebook's plan and what happened to its cells."""

    folder: Path
    name: str
    data: bytes
    plan: list
    forbid: dict
    hide: list
    report: Report
    # set when the first cell starts: sandbox start-up does not count
    deadline: Optional[float] = None
    skip: set = field(default_factory=set)
    # plan position -> {"ename", "evalue"} or {"timed out"}
    cell_errors: dict = field(default_factory=dict)
    sandbox: Optional[Sandbox] = None
    restarts: int = 0


class Grader:
    """Grades notebooks, each in its own fresh sandbox.

    prewarm=True (test suites, one-at-a-time batches) starts the next sandbox in the background
    while the current notebook is graded: a sandbox that has run no student code yet, so nothing
    carries over between notebooks.
    slot: this grader's number among parallel ones (under root, each slot's sandboxes get their own
    uid).
    """

    def __init__(
        self,
        fast: bool = True,
        cell_timeout: Optional[float] = None,
        notebook_timeout: Optional[float] = None,
        isolation: str = "auto",
        limits: Limits = Limits(),
        slot: int = 0,
        prewarm: bool = False,
    ):
        # fast mode runs a whole chapter in under a minute; full size takes up to 10
        if cell_timeout is None:
            cell_timeout = 120.0 if fast else 600.0
        # a whole fast chapter takes < 1 min, full size < 20 min (see README)
        if notebook_timeout is None:
            notebook_timeout = 900.0 if fast else 3600.0
        if cell_timeout <= 0 or notebook_timeout <= 0:
            raise UsageError("time limits must be positive")
        try:
            self.isolation = Isolation.detect(isolation)
        except SandboxError as error:
            raise UsageError(str(error)) from None
        self.fast, self.cell_timeout, self.notebook_timeout = fast, cell_timeout, notebook_timeout
        self.limits, self.slot, self.prewarm = limits, slot, prewarm
        # launched, not yet waited for: python + torch starting up
        self._spare: Optional[Sandbox] = None
        self._spares = 0

    def close(self):
        spare = self._take_spare()
        if spare is not None:
            spare.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sandboxes ---------------------------------------------------------------------------------
    def _new_sandbox(self, hide: list) -> Sandbox:
        # the other uid of this slot than the spare's, so that the two never share a process count
        return Sandbox(
            self.isolation,
            self.limits,
            self.fast,
            self.slot,
            hide=hide,
            uid_offset=(self._spares + 1) % 2,
        )

    def _start_spare(self) -> None:
        self._spares += 1
        sandbox = Sandbox(
            self.isolation, self.limits, self.fast, self.slot, uid_offset=self._spares % 2
        )
        try:
            sandbox.launch()
        except SandboxError:
            return
        self._spare = sandbox

    def _take_spare(self) -> Optional[Sandbox]:
        """The spare sandbox once ready, or None (none started, or it failed: then a fresh one is
        started)."""
        sandbox, self._spare = self._spare, None
        if sandbox is None:
            return None
        try:
            sandbox.wait_ready()
        except SandboxError:
            sandbox.close()
            return None
        return sandbox

    def _sandbox_for(self, run: _Run) -> bool:
        """Give `run` a fresh sandbox, set up for its chapter: False (and a problem noted) if none
        starts."""
        if run.sandbox is not None:
            run.sandbox.close()
        run.sandbox = None
        sandbox = None
        # a spare only when nothing needs hiding from it (a spare started before this notebook was
        # known) and only for the first sandbox of a notebook: restarts start fresh ones
        if (
            self.prewarm
            and self.isolation.level == "bubblewrap"
            and not run.hide
            and run.restarts == 0
        ):
            sandbox = self._take_spare()
        try:
            if sandbox is None:
                sandbox = self._new_sandbox(run.hide)
                sandbox.start(run.name, run.data)
            if self.prewarm and self._spare is None:
                self._start_spare()
            notebook = (
                torch.frombuffer(bytearray(run.data), dtype=torch.uint8) if run.data else None
            )
            reply, _ = sandbox.request(
                {"op": "setup", "forbid": run.forbid, "notebook": run.name},
                {"notebook": notebook} if notebook is not None else None,
                timeout=60,
            )
        except SandboxError as error:
            if sandbox is not None:
                sandbox.close()
            run.report.problems.append(f"the sandbox could not start: {error}")
            return False
        run.sandbox = sandbox
        return True

    def _run_plan(self, run: _Run) -> Optional[int]:
        """Run the planned cells; the position of a cell that killed (or hung) the sandbox, else
        None."""
        run.cell_errors.clear()
        if run.deadline is None:
            run.deadline = time.monotonic() + self.notebook_timeout
        for position, step in enumerate(run.plan):
            if position in run.skip:
                continue
            left = run.deadline - time.monotonic()
            if left <= 0:
                problem = (
                    f"the notebook ran past its {self.notebook_timeout:g} s limit; {step.label} "
                    "and the "
                    f"cells after it were not run"
                )
                if problem not in run.report.problems:
                    run.report.problems.append(problem)
                return None
            limit = min(self.cell_timeout, left)
            try:
                reply, _ = run.sandbox.request(
                    {"op": "run", "source": step.source, "timeout": limit, "stash": step.defines},
                    timeout=limit + GRACE_SECONDS,
                )
            except SandboxError:
                return position
            if reply.get("status") == "timed out":
                run.cell_errors[position] = {"timed out": True}
            elif reply.get("status") == "error":
                run.cell_errors[position] = {
                    "ename": str(reply.get("ename", "Exception")),
                    "evalue": str(reply.get("evalue", "")),
                }
        return None

    def _prepare(self, run: _Run) -> bool:
        """A sandbox that has run the plan, skipping (and reporting) cells that kill or hang it."""
        for _ in range(4):
            if not self._sandbox_for(run):
                return False
            died_at = self._run_plan(run)
            if died_at is None:
                return True
            run.skip.add(died_at)
            run.report.problems.append(
                f"the sandbox died or hung while running {run.plan[died_at].label}; a "
                f"fresh one ran the notebook again without that cell"
            )
            run.restarts += 1
        run.report.problems.append("the sandbox died too often: stopped grading")
        return False

    # -- grading -----------------------------------------------------------------------------------
    def grade(
        self,
        path,
        *,
        seed: Optional[int] = None,
        timeout: float = 60.0,
        extra_dir: Optional[str] = None,
        exercises_only: bool = False,
        chapter: Optional[str] = None,
    ) -> Report:
        """Grade one notebook. Raises UsageError for bad arguments; every problem with the notebook
        is reported."""
        from .checks import chapter_module, forbidden_paths

        start = time.perf_counter()
        path = Path(path)
        report = Report(
            notebook=str(path),
            fast=self.fast,
            isolation=self.isolation.description,
            mode="exercise cells only" if exercises_only else "whole notebook",
        )
        extra = _extra_checks(extra_dir)
        if timeout <= 0:
            raise UsageError("time limits must be positive")
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        # never the notebook's metadata: the student controls it
        number = chapter or chapter_number(path)
        if number is None:
            raise UsageError(
                f"cannot tell which chapter {path} is: name it NN_name.ipynb or pass --chapter NN"
            )
        try:
            module = chapter_module(number)
        except LookupError:
            raise UsageError(
                f"chapter {number} has no graded tasks (no minisd/course/checks/ch{number}_*.py)"
            ) from None
        notebook = _read_notebook(path, report)
        if notebook is None:
            report.seconds = time.perf_counter() - start
            return report
        report.chapter = number
        report.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        tasks = list(module.TASKS)
        hide = [
            p
            for p in [path.resolve().parent] + ([Path(extra_dir).resolve()] if extra_dir else [])
            if _needs_hiding(p)
        ]
        run = _Run(
            path.resolve().parent,
            path.name,
            path.read_bytes(),
            plan_cells(notebook, {t.name for t in tasks}, exercises_only),
            forbidden_paths(tasks),
            hide,
            report,
        )
        try:
            alive = self._prepare(run)
            for task in tasks:
                report.tasks.extend(
                    self._grade_task(run, task, number, report.seed, timeout, extra, alive)
                )
                alive = alive and run.sandbox is not None
        finally:
            if run.sandbox is not None:
                run.sandbox.close()
        self._note_cell_errors(run, exercises_only)
        if run.sandbox is not None and run.sandbox.output_bytes > (self.limits.output_kb << 10):
            report.problems.append(
                f"the notebook printed {run.sandbox.output_bytes >> 10} kB; only the last "
                f"{self.limits.output_kb} kB were kept"
            )
        report.seconds = time.perf_counter() - start
        return report

    def _grade_task(
        self, run: _Run, task, number: str, seed: int, timeout: float, extra: dict, alive: bool
    ) -> list:
        from .checks import evaluate, task_seed
        from .remote import RemoteTask

        checks = [("", task.check, task_seed(seed, task.name))]
        checks += [
            (label, check, task_seed(seed, f"{task.name}/{label.split('::')[-1]}"))
            for label, (name, check) in extra["checks"].items()
            if name == task.name
        ]
        outcomes = []
        for label, check, check_seed in checks:
            if run.sandbox is None or not run.sandbox.alive:
                if not alive or run.restarts > 3:
                    outcomes.append(
                        {
                            "task": task.name,
                            "check": label,
                            "status": "not graded",
                            "seconds": 0.0,
                            "message": "grading stopped: "
                            + (run.report.problems[-1] if run.report.problems else "no sandbox"),
                        }
                    )
                    continue
                run.restarts += 1
                alive = self._prepare(run)
                if not alive:
                    outcomes.append(
                        {
                            "task": task.name,
                            "check": label,
                            "status": "not graded",
                            "seconds": 0.0,
                            "message": "grading stopped: " + run.report.problems[-1],
                        }
                    )
                    continue
            remote = RemoteTask(run.sandbox, task.name, task.forbidden, timeout, run.forbid)
            outcome = dict(
                evaluate(task.name, task.signature, check, remote, check_seed), check=label
            )
            if outcome["status"] == "missing":
                detail = _missing_detail(task.name, run.plan, run.skip, run.cell_errors)
                if detail:
                    outcome["message"] = f"`{task.name}` is not defined because {detail}"
            if outcome["status"] in ("timed out", "crashed") and run.sandbox is not None:
                # interrupted code leaves the sandbox in doubt: the next check gets a new one
                run.sandbox.close()
            outcomes.append(outcome)
        for filename, message in extra["errors"]:
            outcomes.append(
                {
                    "task": task.name,
                    "check": filename,
                    "status": "grader error",
                    "seconds": 0.0,
                    "message": message,
                }
            )
        return outcomes

    def _note_cell_errors(self, run: _Run, exercises_only: bool) -> None:
        if exercises_only:
            return
        for position, error in sorted(run.cell_errors.items()):
            step = run.plan[position]
            if step.generated or error.get("ename") == "NotImplementedError":
                continue
            if error.get("timed out"):
                run.report.notebook_errors.append(
                    f"{step.label} ran past the {self.cell_timeout:g} s limit per "
                    f"cell and was interrupted"
                )
            else:
                run.report.notebook_errors.append(f"{step.label} raised {_error_text(error)}")


def _needs_hiding(path: Path) -> bool:
    """Whether a folder lies inside what a bubblewrap sandbox can read (then it is masked there)."""
    from .sandbox import _visible_paths

    return any(v == path or v in path.parents for v in _visible_paths())


def _error_text(error: dict) -> str:
    from .checks import _clean

    if error.get("timed out"):
        return "timed out"
    value = re.sub(
        r"\((?:\d+\.py|<[^>]*>), line (\d+)\)", r"(line \1 of the cell)", error.get("evalue", "")
    )
    value = _clean(value, 300)
    name = _clean(error.get("ename", ""), 80)
    return f"{name}: {value}" if value else name


def _extra_checks(extra_dir: Optional[str]) -> dict:
    """{"checks": {"file.py::name": (task, check)}, "errors": [(file name, message)]}, loaded in
    this process."""
    from .checks import _clean, load_extra_checks

    found: dict = {"checks": {}, "errors": []}
    if extra_dir is None:
        return found
    folder = Path(extra_dir)
    if not folder.is_dir():
        raise UsageError(f"--extra-checks {extra_dir}: not a folder")
    files = sorted(folder.glob("*.py"))
    if not files:
        raise UsageError(f"--extra-checks {extra_dir}: no .py files in it")
    for path in files:
        try:
            for task, label, check in load_extra_checks(str(path)):
                found["checks"][f"{path.name}::{label}"] = (task, check)
        # noqa: BLE001 - a broken instructor file is reported, not raised
        except Exception as error:
            found["errors"].append(
                (
                    path.name,
                    f"cannot load extra checks {path.name}: {type(error).__name__}: "
                    f"{_clean(str(error))}",
                )
            )
    return found


def _read_notebook(path: Path, report: Report):
    import nbformat

    try:
        notebook = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
        if not isinstance(notebook.get("cells"), list):
            raise ValueError("it has no list of cells")
        return notebook
    except Exception as error:  # noqa: BLE001 - invalid JSON, not a notebook, unreadable bytes, ...
        report.problems.append(
            f"{path} is not a readable Jupyter notebook ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}). If you edited it by hand, restore it from "
            f"the chapter folder or from Jupyter's checkpoint."
        )
        report.fatal = True
        return None


def _missing_detail(task: str, plan: list, skip: set, cell_errors: dict) -> str:
    """Why a task is missing: the cell defining it raised before the def ran (e.g. a SyntaxError).
    """
    for position, step in enumerate(plan):
        if task in step.defines and position in cell_errors:
            return f"{step.label} raised {_error_text(cell_errors[position])}"
        if task in step.defines and position in skip:
            return f"{step.label} was skipped (the sandbox died while running it)"
    return ""


def grade(
    path,
    *,
    seed: Optional[int] = None,
    timeout: float = 60.0,
    cell_timeout: Optional[float] = None,
    extra_dir: Optional[str] = None,
    exercises_only: bool = False,
    fast: bool = True,
    chapter: Optional[str] = None,
    isolation: str = "auto",
    limits: Limits = Limits(),
    notebook_timeout: Optional[float] = None,
) -> Report:
    """Grade one notebook in a fresh sandbox (see the module docstring)."""
    with Grader(
        fast=fast,
        cell_timeout=cell_timeout,
        notebook_timeout=notebook_timeout,
        isolation=isolation,
        limits=limits,
    ) as grader:
        return grader.grade(
            path,
            seed=seed,
            timeout=timeout,
            extra_dir=extra_dir,
            exercises_only=exercises_only,
            chapter=chapter,
        )


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
    if report.isolation:
        lines.append(f"  isolation: {report.isolation}")
    width = max(
        [len(t["task"] + (f" [{t['check']}]" if t.get("check") else "")) for t in report.tasks]
        + [10]
    )
    for t in report.tasks:
        name = t["task"] + (f" [{t['check']}]" if t.get("check") else "")
        mark = "✔" if t["status"] == "passed" else "✘"
        lines.append(
            f"  {mark} {name:<{width}}  {t['status']}"
            + (f": {t['message']}" if t.get("message") else "")
        )
    for note in report.notebook_errors[:8]:
        lines.append(f"  note: {note}")
    if len(report.notebook_errors) > 8:
        lines.append(f"  note: ... and {len(report.notebook_errors) - 8} more cells raised errors")
    for problem in report.problems:
        lines.append(f"  problem: {problem}")
    if report.tasks:
        lines.append(
            f"Score: {report.passed}/{len(report.tasks)} passed ({report.seconds:.0f} s)"
            + (
                ""
                if report.ok or report.seed is None
                else f"; repeat these inputs with --seed {report.seed}"
            )
        )
    else:
        lines.append("Not graded.")
    return "\n".join(lines)
