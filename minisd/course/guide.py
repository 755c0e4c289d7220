"""The instructor's side of the course: the guide (solutions, reference answers, rubrics, time per
task) and the student handout, written to folders of the teacher's choosing.

    python -m minisd.course handout OUT/   exactly the student files (what `build` writes to
    chapters/)
    python -m minisd.course guide OUT/     one guide per chapter: never hand this folder out

Reference answers and rubrics for the thinking exercises live in minisd/course/guide/chNN.md, one
section per exercise: a line `## <title>` (the exercise's title as the notebook writes it, e.g. `##
positions`), then free markdown, conventionally **Answer.** and **Rubric.** paragraphs. The graded
tasks' solutions come from the solution regions of notebooks/, their level and time from the
chapter's checks module.

Thinking exercises are found in the notebook's exercise section: headings `### Exercise N
(thinking): title` or `### Exercise N: title` (not "(graded)"), and numbered items `N. *Title.* ...`
of an "Ungraded exercises" list.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import build as course_build

GUIDE_DIR = Path(__file__).parent / "guide"
HEADING = re.compile(r"^###\s+Exercise\s+(\d+)\s*(\((?P<kind>[^)]*)\))?\s*:\s*(?P<title>.+?)\s*$")
LIST_ITEM = re.compile(r"^(\d+)\.\s+(\*(?P<title>[^*]+?)\.?\*)?\s*(?P<rest>.*)$")


@dataclass
class Exercise:
    label: str  # "Exercise 3" or "Ungraded 2"
    title: str  # "positions"
    text: str  # the question, as the notebook states it


def _first_words(text: str, n: int = 8) -> str:
    words = re.sub(r"[`*$]", "", text).split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def _key(title: str) -> str:
    return " ".join(re.sub(r"[$*`.?!:]", "", title).lower().split())


def thinking_exercises(notebook) -> list[Exercise]:
    """The chapter's ungraded (thinking) exercises, in order."""
    found: list[Exercise] = []
    in_section = False
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        if any(line.strip() == "## Exercises" for line in lines):
            in_section = True
        if not in_section:
            continue
        current: Optional[Exercise] = None
        in_list = False
        for line in lines:
            heading = HEADING.match(line)
            item = LIST_ITEM.match(line) if in_list else None
            if heading:
                kind = (heading.group("kind") or "").lower()
                current = None
                if "graded" not in kind or "ungraded" in kind:
                    current = Exercise(f"Exercise {heading.group(1)}", heading.group("title"), "")
                    found.append(current)
            elif "ungraded exercises" in line.lower():
                in_list, current = True, None
            elif item:
                title = (item.group("title") or "").strip() or _first_words(item.group("rest"))
                current = Exercise(f"Ungraded {item.group(1)}", title, item.group("rest"))
                found.append(current)
            elif line.startswith("#"):
                current, in_list = None, False
            elif current is not None:
                current.text = (current.text + "\n" + line.strip()).strip()
    return found


def load_rubrics(number: str) -> dict[str, str]:
    """{normalised title: markdown} from minisd/course/guide/chNN.md (empty if the file does not
    exist).
    """
    path = GUIDE_DIR / f"ch{number}.md"
    if not path.is_file():
        return {}
    sections: dict[str, str] = {}
    title = None
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("## "):
            title = _key(line[3:])
            sections[title] = ""
        elif title is not None:
            sections[title] += line + "\n"
    return {k: v.strip() for k, v in sections.items()}


def rubric_for(rubrics: dict, exercise: Exercise) -> Optional[str]:
    """By title, else by label ('## Ungraded 2' for list items without a title)."""
    return rubrics.get(_key(exercise.title)) or rubrics.get(_key(exercise.label))


def _solutions(notebook, checks) -> dict[str, tuple[str, int]]:
    """Task name -> (the instructor's cell that defines it, solution markers removed; lines a
    student writes).
    """
    names = {t.name for t in (checks.TASKS if checks else [])}
    found = {}
    for cell in notebook.cells:
        if cell.cell_type != "code" or course_build.BEGIN not in cell.source:
            continue
        defs = course_build.cell_definitions(cell.source)
        clean = "\n".join(
            line
            for line in cell.source.split("\n")
            if line.strip() not in (course_build.BEGIN, course_build.END)
        )
        for name in defs.functions:
            if name in names:
                found[name] = (clean, student_lines(cell.source))
    return found


def student_lines(source: str) -> int:
    """Lines a student writes for a task: the non-blank, non-comment lines inside its solution
    regions.
    """
    return sum(
        1
        for line in course_build.solution_lines(source)
        if line.strip() and not line.strip().startswith("#")
    )


def chapter_guide(path: Path) -> str:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    number = path.name[:2]
    checks = course_build.chapter_checks(number)
    title = course_build.title_of(notebook, path.stem)
    tasks = list(checks.TASKS) if checks else []
    solutions = _solutions(notebook, checks)
    rubrics = load_rubrics(number)
    out = [
        f"# Instructor's guide, chapter {int(number)}: {title}",
        "",
        "*Not for students: solutions, reference answers and rubrics. Generated by "
        f"`python -m minisd.course guide` from notebooks/{path.name}, minisd/course/checks/ and "
        f"minisd/course/guide/ch{number}.md.*",
        "",
    ]
    if tasks:
        total = sum(t.minutes for t in tasks)
        out += [
            "## Graded tasks",
            "",
            f"About {total} minutes of graded work.",
            "",
            "| task | level | minutes | lines to write |",
            "|---|---|---|---|",
        ]
        for t in tasks:
            out.append(
                f"| `{t.name}` | {t.level} | {t.minutes} | {solutions.get(t.name, ('', 0))[1]} |"
            )
        out.append("")
        for t in tasks:
            out += [
                f"### `{t.name}{t.signature}`",
                "",
                textwrap.dedent(t.summary).strip(),
                "",
                "```python",
                solutions.get(t.name, ("# (no solution cell found)", 0))[0].rstrip(),
                "```",
                "",
            ]
    exercises = thinking_exercises(notebook)
    if exercises:
        out += ["## Thinking exercises", ""]
        for ex in exercises:
            answer = rubric_for(rubrics, ex) or "*(no reference answer yet)*"
            out += [
                f"### {ex.label}: {ex.title}",
                "",
                "> " + ex.text.replace("\n", "\n> "),
                "",
                answer,
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def write_guide(out: Path, root: Optional[Path] = None) -> list[Path]:
    root = Path(root) if root is not None else course_build.repo_root()
    written = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        if not course_build.NOTEBOOK_NAME.match(path.name):
            continue
        target = out / f"{path.stem}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(chapter_guide(path), encoding="utf-8")
        written.append(target)
    return written


def write_handout(out: Path, root: Optional[Path] = None) -> list[Path]:
    """Exactly the files `build` writes to chapters/, under `out` instead."""
    root = Path(root) if root is not None else course_build.repo_root()
    written = []
    for path, text in course_build.build_outputs(root).items():
        target = out / path.relative_to(root / "chapters")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written
