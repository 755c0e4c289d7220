"""The course machinery: chapters/ generated from notebooks/, the autograder, and the notebook
helpers.

Cost design: grading a whole notebook means executing it (up to ~45 s each in fast mode), and
tests/test_notebooks.py already executes every notebook once. Here the chapter notebooks are graded
with `exercises_only=True` (the exercise cells plus the imports/defs they read, found with ast) in
ONE kernel shared across notebooks with its namespace reset between them
(`Grader(reuse_kernel=True)`), so a grading costs about a second. The whole-notebook path (the stash
of graded functions, cell errors, the working folder) and the fresh-kernel CLI are tested on small
synthetic notebooks.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from minisd.course import build as course_build  # noqa: E402
from minisd.course.__main__ import main as course_main  # noqa: E402
from minisd.course.checks import chapter_module  # noqa: E402
from minisd.course.grade import Grader, format_report  # noqa: E402
from minisd.course.helpers import cmp, show_images, show_maps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in (ROOT / "notebooks").glob("*.ipynb") if course_build.NOTEBOOK_NAME.match(p.name)
)
KNOWN_STATUSES = {
    "passed",
    "failed",
    "not attempted",
    "error",
    "missing",
    "wrong signature",
    "timed out",
    "crashed",
    "not graded",
    "grader error",
}


def chapter_of(path: Path) -> str:
    return path.name[:2]


def assignment(number: str) -> Path:
    matches = [p for p in NOTEBOOKS if chapter_of(p) == number]
    if not matches:
        pytest.skip(f"notebook for chapter {number} not written yet")
    return ROOT / "chapters" / matches[0].stem / "assignment.ipynb"


@pytest.fixture(scope="module")
def grader():
    with Grader(fast=True, cell_timeout=120, reuse_kernel=True) as g:
        yield g


def statuses(report) -> dict:
    assert all(t["status"] in KNOWN_STATUSES for t in report.tasks), report.tasks
    return {
        t["task"] + (f"[{t['check']}]" if t.get("check") else ""): t["status"] for t in report.tasks
    }


def ch05(**given) -> dict:
    """Chapter 5's expected statuses: the given ones, every other task of the chapter not attempted."""
    tasks = {t.name: "not attempted" for t in chapter_module("05").TASKS}
    return dict(tasks, **given)


def messages(report) -> dict:
    return {t["task"]: t["message"] for t in report.tasks if not t.get("check")}


def with_function(notebook_path: Path, out: Path, replacements: dict) -> Path:
    """A copy of a student notebook with the cells defining the given functions replaced by new
    source."""
    nb = nbformat.read(notebook_path, as_version=4)
    for name, source in replacements.items():
        cells = [
            c
            for c in nb.cells
            if c.cell_type == "code" and re.search(rf"^def {name}\(", c.source, re.M)
        ]
        assert cells, f"no cell defines {name} in {notebook_path}"
        cells[0].source = source
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


# ----------------------------------------------------------------------------------------------
# build


def test_chapters_are_up_to_date_with_notebooks():
    report = io.StringIO()
    assert course_build.build(ROOT, check=True, out=report) == 0, (
        report.getvalue() + "\nrun `python -m minisd.course build` and commit chapters/"
    )


def test_build_is_deterministic():
    first, second = course_build.build_outputs(ROOT), course_build.build_outputs(ROOT)
    assert first == second


def test_strip_solutions_keeps_indentation_and_uses_the_hint():
    source = (
        'def f(x):\n    """doc"""\n    ### BEGIN SOLUTION\n    # hint: add "one"\n    y = x + 1\n'
        "    return y\n    ### END SOLUTION\n\nclass A:\n    def g(self):\n        ### BEGIN SOLUTION\n"
        "        return 2\n        ### END SOLUTION\n"
    )
    out = course_build.strip_solutions(source, "test")
    assert out == (
        'def f(x):\n    """doc"""\n    raise NotImplementedError("add \\"one\\"")\n\nclass A:\n'
        "    def g(self):\n"
        '        raise NotImplementedError("write the body of g() (see its docstring)")\n'
    )
    compile(out, "stub", "exec")


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without a"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
        ("x = 1  ### BEGIN SOLUTION\n", "stand alone"),
    ],
)
def test_malformed_solution_regions_are_reported(source, problem):
    with pytest.raises(course_build.BuildError, match=problem):
        course_build.strip_solutions(source, "notebooks/99_x.ipynb, cell 3")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_solution_text_reaches_students(notebook):
    """Every line inside a solution region (hints aside) is absent from the chapter's generated
    files, unless the teacher's notebook also shows that line outside the regions."""
    nb = nbformat.read(notebook, as_version=4)
    inside, outside = set(), set()
    for cell in nb.cells:
        lines = cell.source.split("\n")
        region = (
            set(course_build.solution_lines(cell.source)) if cell.cell_type == "code" else set()
        )
        inside |= {l.strip() for l in region}
        outside |= {l.strip() for l in lines if l not in region}
    secret = {l for l in inside - outside if l and not l.lower().startswith("# hint:")}
    assert secret, f"{notebook.name}: no solution lines found"
    folder = ROOT / "chapters" / notebook.stem
    student = nbformat.read(folder / "assignment.ipynb", as_version=4)
    shown = {l.strip() for c in student.cells for l in c.source.split("\n")}
    shown |= {l.strip() for l in (folder / "README.md").read_text(encoding="utf-8").split("\n")}
    leaked = sorted(l for l in secret if l in shown)
    assert not leaked, f"solution lines in chapters/{notebook.stem}: {leaked}"
    code = [c for c in student.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert student.metadata["minisd"]["chapter"] == chapter_of(notebook)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_work_from_the_chapter_folder_too(notebook):
    """Students run the same cells from chapters/NN_name/, one folder deeper than notebooks/: no
    '..' paths."""
    problems = course_build.working_folder_problems(
        nbformat.read(notebook, as_version=4), notebook.name
    )
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# grading the chapters


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_reference_solutions_score_full_marks(grader, notebook):
    report = grader.grade(notebook, exercises_only=True)
    tasks = chapter_module(chapter_of(notebook)).TASKS
    assert len(report.tasks) == len(tasks) and report.ok, format_report(report)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_untouched_student_notebook_is_not_attempted(grader, notebook):
    report = grader.grade(
        ROOT / "chapters" / notebook.stem / "assignment.ipynb", exercises_only=True
    )
    tasks = chapter_module(chapter_of(notebook)).TASKS
    assert statuses(report) == {t.name: "not attempted" for t in tasks}, format_report(report)
    assert not report.ok and not report.problems


WRONG = {
    "01": (
        "scaled_dot_product_attention",
        "import torch\ndef scaled_dot_product_attention(q, k, v, mask=None):\n"
        "    scores = q @ k.transpose(-2, -1)\n"
        "    if mask is not None:\n        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)\n"
        "    return scores.softmax(-1) @ v\n",
        r"without the scale.*√d",
    ),
    "02": (
        "geglu",
        "import torch.nn.functional as F\ndef geglu(x, weight, bias):\n"
        "    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)\n    return F.gelu(value) * gate\n",
        "first half is the value",
    ),
    "03": (
        "timestep_embedding",
        "import math, torch\ndef timestep_embedding(timesteps, dim):\n"
        "    half = dim // 2\n"
        "    w = torch.exp(-math.log(10000) * torch.arange(half) / half)\n"
        "    a = timesteps.float()[:, None] * w\n"
        "    return torch.cat([a.sin(), a.cos()], -1)\n",
        "cosines first",
    ),
    "05": (
        "gaussian_kl",
        "def gaussian_kl(mean, logvar):\n"
        "    return (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])\n",
        "times 2",
    ),
    "09": (
        "classifier_free_guidance",
        "def classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
        "    return eps_cond + scale * (eps_uncond - eps_cond)\n",
        "swapped",
    ),
    "10": (
        "split_fused_qkv",
        "def split_fused_qkv(in_proj_weight):\n"
        "    return tuple(w.T for w in in_proj_weight.chunk(3, dim=0))\n",
        "transpose",
    ),
}


@pytest.mark.parametrize("number", sorted(WRONG))
def test_wrong_solutions_fail_with_a_useful_message(grader, tmp_path, number):
    name, source, expected_message = WRONG[number]
    path = with_function(assignment(number), tmp_path / "wrong.ipynb", {name: source})
    report = grader.grade(path, exercises_only=True)
    assert statuses(report)[name] == "failed", format_report(report)
    assert re.search(expected_message, messages(report)[name]), format_report(report)


# ---------------------------------------------------------------------------------------------- bad
# submissions


def test_raising_and_looping_functions_are_reported_per_task(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "bad.ipynb",
        {
            "reparameterize": "def reparameterize(mean, logvar, noise):\n    raise ValueError('oops')\n",
            "gaussian_kl": "def gaussian_kl(mean, logvar):\n    n = 0\n    while True:\n        n += 1\n",
        },
    )
    report = grader.grade(path, exercises_only=True, timeout=2)
    assert statuses(report) == ch05(reparameterize="error", gaussian_kl="timed out"), (
        format_report(report)
    )
    assert "ValueError: oops" in messages(report)["reparameterize"]
    assert "line 2" in messages(report)["reparameterize"]  # where in the student's cell


def test_wrong_signature_and_wrong_shape_are_reported(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "bad.ipynb",
        {
            "reparameterize": "def reparameterize(mean, logvar):\n    return mean\n",
            "gaussian_kl": "def gaussian_kl(mean, logvar):\n    return (mean ** 2).sum(dim=[2, 3])\n",
        },
    )
    report = grader.grade(path, exercises_only=True)
    assert statuses(report) == ch05(reparameterize="wrong signature", gaussian_kl="failed"), (
        format_report(report)
    )
    assert (
        "expected reparameterize(mean, logvar, noise), yours is reparameterize(mean, logvar)"
        in messages(report)["reparameterize"]
    )
    assert re.search(r"expected shape \(\d+,\), got \(\d+, \d+\)", messages(report)["gaussian_kl"])


def test_syntax_errors_missing_functions_and_kernel_deaths_are_reported(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "bad.ipynb",
        {
            "reparameterize": "def reparameterize(mean, logvar, noise)\n    return mean\n",
            "gaussian_kl": "import os\ndef gaussian_kl(mean, logvar):\n    os._exit(3)\n",
        },
    )
    report = grader.grade(path, exercises_only=True)
    assert statuses(report) == ch05(reparameterize="missing", gaussian_kl="crashed"), (
        format_report(report)
    )
    assert "SyntaxError" in messages(report)["reparameterize"]
    # the grader replaced the dead kernel: the next notebook grades normally
    path = with_function(
        assignment("05"), tmp_path / "missing.ipynb", {"reparameterize": "x = 1\n"}
    )
    report = grader.grade(path, exercises_only=True)
    assert statuses(report) == ch05(reparameterize="missing"), (
        format_report(report)
    )


def test_a_loop_that_ignores_interrupts_is_timed_out_and_grading_goes_on(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "stubborn.ipynb",
        {
            "reparameterize": "import time\ndef reparameterize(mean, logvar, noise):\n    while True:\n        try:\n"
            "            time.sleep(100)\n        except BaseException:\n            pass\n",
        },
    )
    report = grader.grade(path, exercises_only=True, timeout=1)
    assert statuses(report) == ch05(reparameterize="timed out"), (
        format_report(report)
    )


def test_cli_reports_json_and_exit_status(tmp_path, capsys):
    broken = tmp_path / "05_broken.ipynb"
    broken.write_text('{"cells": [ oops', encoding="utf-8")
    assert course_main(["grade", str(broken)]) == 1
    assert "not a readable Jupyter notebook" in capsys.readouterr().out

    assert course_main(["grade", str(tmp_path / "nothing.ipynb")]) == 2
    for bad_arguments in (["--timeout", "soon"], ["--chapter", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            course_main(["grade", str(broken), *bad_arguments])
        assert exit_info.value.code == 2
    capsys.readouterr()

    path = with_function(
        assignment("05"),
        tmp_path / "attempt.ipynb",
        {
            "reparameterize": "import torch\ndef reparameterize(mean, logvar, noise):\n"
            "    return mean + torch.exp(0.5 * logvar) * noise\n"
        },
    )
    assert course_main(["grade", str(path), "--json", "--exercises-only", "--seed", "7"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (
        report["seed"] == 7
        and report["chapter"] == "05"
        and report["total"] == len(chapter_module("05").TASKS)
        and report["passed"] == 1
    )
    assert {t["task"]: t["status"] for t in report["tasks"]} == ch05(reparameterize="passed")


# ----------------------------------------------------------------------------------------------
# whole-notebook mode


def synthetic_notebook(path: Path, cells: list[str], chapter: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["minisd"] = {"chapter": chapter}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def test_whole_notebook_grading_keeps_the_students_function(tmp_path):
    """A later cell rebinding the task's name (as chapters do with the package's version) does not
    replace the student's function; other cells' errors are listed; the kernel runs in the
    notebook's folder."""
    path = synthetic_notebook(
        tmp_path / "exercise.ipynb",
        [
            "import os\nFAST = os.environ.get('MINISD_FAST') == '1'\nopen('ran-here.txt', 'w').write(str(FAST))",
            "import torch\ndef classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
            "    return eps_uncond + scale * (eps_cond - eps_uncond)",
            "classifier_free_guidance = lambda *args: 0  # the notebook moves on to the package's version",
            "1 / 0",
        ],
        chapter="09",
    )
    with Grader(fast=True) as grader:
        report = grader.grade(path, seed=3)
    assert statuses(report) == {"classifier_free_guidance": "passed"}, format_report(report)
    assert (tmp_path / "ran-here.txt").read_text() == "True"
    assert len(report.notebook_errors) == 1 and "ZeroDivisionError" in report.notebook_errors[0]


def test_extra_checks_run_and_count(grader, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "more.py").write_text(
        "from minisd.course.checks import extra_check\n\n"
        "@extra_check('classifier_free_guidance')\ndef scale_zero(ctx):\n"
        "    u, c = ctx.randn(2, 3), ctx.randn(2, 3)\n"
        "    ctx.expect_close(ctx.call(u, c, 0.0), u, what='scale 0')\n\n"
        "@extra_check('classifier_free_guidance')\ndef always_fails(ctx):\n    ctx.fail('hidden failure')\n"
    )
    path = synthetic_notebook(
        tmp_path / "exercise.ipynb",
        [
            "def classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
            "    return eps_uncond + scale * (eps_cond - eps_uncond)"
        ],
        chapter="09",
    )
    report = grader.grade(path, exercises_only=True, extra_dir=str(hidden))
    assert statuses(report) == {
        "classifier_free_guidance": "passed",
        "classifier_free_guidance[more.py::scale_zero]": "passed",
        "classifier_free_guidance[more.py::always_fails]": "failed",
    }, format_report(report)
    assert not report.ok

    (hidden / "typo.py").write_text(
        "from minisd.course.checks import extra_check\n\n"
        "@extra_check('classifier_free_guidence')\ndef check(ctx):\n    pass\n"
    )
    report = grader.grade(path, exercises_only=True, extra_dir=str(hidden))
    assert statuses(report)["classifier_free_guidance[typo.py]"] == "grader error"
    assert "no chapter has a graded task of that name" in report.tasks[-1]["message"]


def test_execute_saves_outputs_and_refuses_failing_notebooks(tmp_path, capsys):
    good = synthetic_notebook(
        tmp_path / "good.ipynb", ["import os\nprint('fast', os.environ.get('MINISD_FAST'))"], "00"
    )
    bad = synthetic_notebook(
        tmp_path / "bad.ipynb", ["print('before')", "raise RuntimeError('broken cell')"], "00"
    )
    before = bad.read_bytes()
    assert course_main(["execute", str(good), str(bad), "--fast"]) == 1
    out = capsys.readouterr().out
    assert "bad.ipynb: FAILED" in out and "cell 2: RuntimeError: broken cell" in out
    assert bad.read_bytes() == before
    outputs = nbformat.read(good, as_version=4).cells[0].outputs
    assert outputs[0]["text"] == "fast 1\n"


# ----------------------------------------------------------------------------------------------
# notebook helpers


def test_cmp_prints_exact_approximate_and_wrong(capsys):
    a = torch.randn(2, 4)
    assert cmp("same", a, a.clone())
    assert cmp("close", a + 1e-7, a)
    wrong = a.clone()
    wrong[0, 3] += 0.42
    assert not cmp("off", wrong, a)
    assert not cmp("shape", a.T, a)
    assert cmp("strings", ["a", "b"], ["a", "b"]) and not cmp("strings2", ["a"], ["b"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "same: exact"
    assert re.fullmatch(r"close: approximate \(max diff [0-9.e-]+\)", lines[1])
    assert lines[2] == "off: WRONG (max diff 0.42 at index (0, 3))"
    assert lines[3] == "shape: WRONG (expected shape (2, 4), got (4, 2))"


def test_show_images_and_maps_draw_grids():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from PIL import Image

    fig = show_images(torch.rand(3, 3, 8, 8), titles=["a", "b", "c"], cols=2, show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    fig = show_images([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))], show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 2
    fig = show_maps(torch.rand(4, 5, 5), show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 4
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        show_images(torch.rand(2, 5, 8, 8), show=False)
    with pytest.raises(ValueError, match="titles"):
        show_images(torch.rand(2, 3, 8, 8), titles=["one"], show=False)
