"""The student handout gives no answer away: no solution expression in any student cell, graded
docstrings replaced by the task's contract, and (handout/guide commands) no instructor text in the
files students get.

Fast: these tests read notebooks and parse Python; nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from minisd.course import answers  # noqa: E402
from minisd.course import build as course_build  # noqa: E402
from minisd.course.checks import chapter_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in (ROOT / "notebooks").glob("*.ipynb") if course_build.NOTEBOOK_NAME.match(p.name)
)

# Expressions a chapter may show although a solution contains them, each with the reason. Keep this
# short: every
# entry is a hole in the test.
ALLOWED = {
    # x̂₀ = (x_t − √(1−ᾱ)·ε)/√ᾱ is chapter 0's graded task and stated in chapter 8's text; chapter
    # 8's task is the DDIM
    # update around it. The same shape appears in chapter 8's v ↔ ε conversions.
    "08": ["(x_t - (1 - a_t).sqrt() * model_output) / a_t.sqrt()"],
    # GroupNorm's forward pass (worked in §1) is not the answer to its backward-pass task.
    "03": ["xg.mean(dim=-1, keepdim=True)"],
    # The clamp range [−30, 20] is part of the Posterior task's contract.
    "05": ["logvar.clamp(-30.0, 20.0)"],
    # The chapter's worked oracle is the equal-weight, equal-width special case; the stretch task
    # generalises it
    # (the responsibilities need log w_k and −½ log v_k). The per-component variance and a softmax
    # over
    # components are shared vocabulary.
    "07": ["a * stds ** 2 + 1 - a", "log_p.softmax(dim=-1)"],
    # m·x + (1 − m)·y: inpainting's paste-back has the shape of the rescale mix (a different
    # quantity).
    "09": ["phi * rescaled + (1 - phi) * eps_guided"],
    # √(1−ᾱ)·noise is chapter 7's q_sample, given in chapter 11; seeding a generator is not an
    # answer.
    "11": ["(1 - a).sqrt() * noise", "torch.Generator().manual_seed(seed)"],
    # §2 derives the loss in code from logits s·u·vᵀ of unit vectors; the task is the symmetric
    # mean of the two cross-entropies around them.
    "13": ["logit_scale * u @ v.T"],
}


def _allowed(number: str) -> set:
    found = set()
    for text in ALLOWED.get(number, []):
        found |= set(answers.expressions(text))
    return found


def _student(notebook: Path):
    return nbformat.read(ROOT / "chapters" / notebook.stem / "assignment.ipynb", as_version=4)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_solution_expression_in_any_student_cell(notebook):
    """For every solution region of the instructor's notebook, its core expressions (≥ MIN_NODES AST
    nodes, variable names anonymised) occur in no code cell of the student notebook: not in the
    stub, not in a worked cell above.
    """
    teacher = nbformat.read(notebook, as_version=4)
    cells = [
        course_build.python_source(c.source)
        for c in _student(notebook).cells
        if c.cell_type == "code"
    ]
    ignore = _allowed(notebook.name[:2])
    regions_seen = 0
    for index, cell in enumerate(teacher.cells):
        if cell.cell_type != "code" or course_build.BEGIN not in cell.source:
            continue
        regions = course_build.find_regions(cell.source, notebook.name)
        regions_seen += len(regions)
        solution = answers.solution_code(cell.source, regions)
        leaked = answers.leaks(solution, cells, ignore)
        assert not leaked, f"{notebook.name}, cell {index + 1}: the student version shows {leaked}"
    assert regions_seen, f"{notebook.name} has no solution regions"


def test_the_leak_detector_sees_through_renaming():
    """The detector must catch a worked cell that renames variables (S/Q/K vs scores/q/k) and must
    not flag code that shares only small vocabulary.
    """
    solution = (
        "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
        "return scores.softmax(dim=-1) @ v\n"
    )
    worked = "S = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])\nO = S.softmax(dim=-1) @ V\n"
    assert answers.leaks(solution, [worked])
    assert not answers.leaks(
        solution, ["out, probs = attention_math(Q, K, V)\nprint(Q.shape[-1])\n"]
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_graded_docstrings_are_the_task_contract(notebook):
    """The docstring of every graded function/class in the student notebook is the task's summary
    (which says what to compute), never the instructor's docstring (which may give the formula).
    """
    tasks = {t.name: t for t in chapter_module(notebook.name[:2]).TASKS}
    found = {}
    for cell in _student(notebook).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(course_build.python_source(cell.source)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in tasks:
                found[node.name] = " ".join((ast.get_docstring(node) or "").split())
    for name, task in tasks.items():
        assert found.get(name) == " ".join(task.summary.split()), (
            f"{notebook.name}: docstring of {name}"
        )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_answer_cells_are_replaced(notebook):
    """A cell tagged `answer` reaches the student version only as its replacement."""
    teacher = nbformat.read(notebook, as_version=4)
    student = {c.get("id"): c for c in _student(notebook).cells}
    for cell in teacher.cells:
        if answers.is_answer_cell(cell):
            kind, text = answers.replacement_for(cell)
            assert student[cell.id].cell_type == kind and student[cell.id].source == text
            assert cell.source not in {c.source for c in student.values()}


# ----------------------------------------------------------------------------------------------
# handout and guide


def test_handout_is_exactly_the_student_files_and_holds_no_instructor_text(tmp_path):
    from minisd.course import guide

    out = tmp_path / "handout"
    written = guide.write_handout(out)
    expected = {
        p.relative_to(ROOT / "chapters"): text
        for p, text in course_build.build_outputs(ROOT).items()
    }
    assert {p.relative_to(out) for p in written} == set(expected)
    assert {p.relative_to(out) for p in out.rglob("*") if p.is_file()} == set(expected)
    for rel, text in expected.items():
        assert (out / rel).read_text(encoding="utf-8") == text

    # rubric and reference-answer text: every substantial line of minisd/course/guide/*.md, in no
    # handout file
    handout_text = "\n".join((out / rel).read_text(encoding="utf-8") for rel in expected)
    rubric_lines = set()
    for path in guide.GUIDE_DIR.glob("ch*.md"):
        rubric_lines |= {
            line.strip()
            for line in path.read_text(encoding="utf-8").split("\n")
            if len(line.strip()) > 30 and not line.startswith("#")
        }
    assert rubric_lines
    leaked = sorted(line for line in rubric_lines if line in handout_text)
    assert not leaked, leaked[:5]
    # solution lines that only a chapter's solution regions hold, in none of that chapter's handout
    # files
    for notebook in NOTEBOOKS:
        cells = nbformat.read(notebook, as_version=4).cells
        inside, outside = set(), set()
        for c in cells:
            region = set(course_build.solution_lines(c.source)) if c.cell_type == "code" else set()
            inside |= {line.strip() for line in region}
            outside |= {line.strip() for line in c.source.split("\n") if line not in region}
        secret = {
            line for line in inside - outside if len(line) > 12 and not line.startswith("# hint")
        }
        shown = set()
        for path in (out / notebook.stem).rglob("*"):
            if path.suffix == ".ipynb":  # the cells' text, not the JSON-escaped file
                text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
            else:
                text = path.read_text(encoding="utf-8")
            shown |= {line.strip() for line in text.split("\n")}
        leaked = sorted(line for line in secret if line in shown)
        assert not leaked, f"{notebook.stem}: {leaked[:5]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_thinking_exercise_has_a_reference_answer_and_rubric(notebook):
    from minisd.course import guide

    exercises = guide.thinking_exercises(nbformat.read(notebook, as_version=4))
    rubrics = guide.load_rubrics(notebook.name[:2])
    for exercise in exercises:
        text = guide.rubric_for(rubrics, exercise)
        assert text, (
            f"{notebook.name}: no entry for {exercise.label} ({exercise.title}) in "
            f"guide/ch{notebook.name[:2]}.md"
        )
        assert "**Answer.**" in text and "**Rubric" in text and "**Time.**" in text, exercise.title
    known = {guide._key(e.title) for e in exercises} | {guide._key(e.label) for e in exercises}
    unknown = set(rubrics) - known
    assert not unknown, f"guide entries for exercises the notebook lacks: {unknown}"


def test_guide_has_every_solution_and_stays_out_of_chapters(tmp_path, capsys):
    from minisd.course.__main__ import main as course_main

    assert course_main(["guide", str(tmp_path / "guide")]) == 0
    for notebook in NOTEBOOKS:
        text = (tmp_path / "guide" / f"{notebook.stem}.md").read_text(encoding="utf-8")
        for task in chapter_module(notebook.name[:2]).TASKS:
            assert f"`{task.name}{task.signature}`" in text
        assert "(no solution cell found)" not in text
    assert course_main(["guide", str(ROOT / "chapters" / "guide")]) == 2
    assert "must not go inside chapters/" in capsys.readouterr().err
    assert not (ROOT / "chapters" / "guide").exists()
