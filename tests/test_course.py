"""The course machinery: chapters/ generated from notebooks/, the autograder, and the notebook
helpers.

Cost design: grading a whole notebook means executing it (up to ~45 s each in fast mode), and
tests/test_notebooks.py already executes every notebook once. Here the chapter notebooks are graded
with `exercises_only=True` (the exercise cells plus the imports/defs they read, found with ast),
each in its own fresh sandbox; `Grader(prewarm=True)` starts the next sandbox (python + torch, no
student code yet) while the current notebook is graded, so a grading costs a few seconds. The
whole-notebook path (the stash of graded functions, cell errors, the working folder) and the CLI are
tested on small synthetic notebooks. Hostile notebooks: tests/test_grader_redteam.py.
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
    with Grader(fast=True, cell_timeout=120, prewarm=True) as g:
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
            if c.cell_type == "code" and re.search(rf"^(def|class) {name}\b", c.source, re.M)
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
        "    return y\n    ### END SOLUTION\n\nclass A:\n    def g(self):\n        ### BEGIN "
        "SOLUTION\n"
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
        "    if mask is not None:\n        scores = scores.masked_fill(~mask, "
        "torch.finfo(scores.dtype).min)\n"
        "    return scores.softmax(-1) @ v\n",
        r"without the scale.*√d",
    ),
    "02": (
        "geglu",
        "import torch.nn.functional as F\ndef geglu(x, weight, bias):\n"
        "    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)\n    return F.gelu(value) * "
        "gate\n",
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
    report = grader.grade(path, exercises_only=True, chapter=number)
    assert statuses(report)[name] == "failed", format_report(report)
    assert re.search(expected_message, messages(report)[name]), format_report(report)


# ---------------------------------------------------------------------------------------------- bad
# submissions


def test_raising_and_looping_functions_are_reported_per_task(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "bad.ipynb",
        {
            "reparameterize": "def reparameterize(mean, logvar, noise):\n    raise "
                              "ValueError('oops')\n",
            "gaussian_kl": "def gaussian_kl(mean, logvar):\n    n = 0\n    while True:\n        n "
                           "+= 1\n",
        },
    )
    report = grader.grade(path, exercises_only=True, timeout=2, chapter="05")
    assert statuses(report) == ch05(reparameterize="error", gaussian_kl="timed out"), format_report(
        report
    )
    assert "ValueError: oops" in messages(report)["reparameterize"]
    assert "line 2" in messages(report)["reparameterize"]  # where in the student's cell


def test_wrong_signature_and_wrong_shape_are_reported(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "bad.ipynb",
        {
            "reparameterize": "def reparameterize(mean, logvar):\n    return mean\n",
            "gaussian_kl": "def gaussian_kl(mean, logvar):\n    return (mean ** 2).sum(dim=[2, "
                           "3])\n",
        },
    )
    report = grader.grade(path, exercises_only=True, chapter="05")
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
    report = grader.grade(path, exercises_only=True, chapter="05")
    assert statuses(report) == ch05(reparameterize="missing", gaussian_kl="crashed"), format_report(
        report
    )
    assert "SyntaxError" in messages(report)["reparameterize"]
    # the grader replaced the dead kernel: the next notebook grades normally
    path = with_function(
        assignment("05"), tmp_path / "missing.ipynb", {"reparameterize": "x = 1\n"}
    )
    report = grader.grade(path, exercises_only=True, chapter="05")
    assert statuses(report) == ch05(reparameterize="missing"), format_report(report)


def test_a_loop_that_ignores_interrupts_is_timed_out_and_grading_goes_on(grader, tmp_path):
    path = with_function(
        assignment("05"),
        tmp_path / "stubborn.ipynb",
        {
            "reparameterize": "import time\ndef reparameterize(mean, logvar, noise):\n    while "
                              "True:\n        try:\n"
            "            time.sleep(100)\n        except BaseException:\n            pass\n",
        },
    )
    report = grader.grade(path, exercises_only=True, timeout=1, chapter="05")
    assert statuses(report) == ch05(reparameterize="timed out"), format_report(report)


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
    assert (
        course_main(
            ["grade", str(path), "--json", "--exercises-only", "--seed", "7", "--chapter", "05"]
        )
        == 1
    )
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
    replace the student's function; other cells' errors are listed; the notebook runs in a fresh
    folder holding only a copy of itself, and writes nothing beside the original."""
    path = synthetic_notebook(
        tmp_path / "exercise.ipynb",
        [
            "import os\nassert os.environ.get('MINISD_FAST') == '1' and os.listdir('.') == "
            "['exercise.ipynb'], "
            "os.listdir('.')\nopen('ran-here.txt', 'w').write('x')",
            "import torch\ndef classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
            "    return eps_uncond + scale * (eps_cond - eps_uncond)",
            "classifier_free_guidance = lambda *args: 0  # the notebook moves on to the package's "
            "version",
            "1 / 0",
        ],
        chapter="09",
    )
    with Grader(fast=True) as grader:
        report = grader.grade(path, seed=3, chapter="09")
    others = {
        t.name: "missing" for t in chapter_module("09").TASKS
    }  # the notebook writes only one task
    assert statuses(report) == dict(others, classifier_free_guidance="passed"), format_report(
        report
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exercise.ipynb"]
    assert len(report.notebook_errors) == 1 and "ZeroDivisionError" in report.notebook_errors[0]


def test_extra_checks_run_and_count(grader, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "more.py").write_text(
        "from minisd.course.checks import extra_check\n\n"
        "@extra_check('classifier_free_guidance')\ndef scale_zero(ctx):\n"
        "    u, c = ctx.randn(2, 3), ctx.randn(2, 3)\n"
        "    ctx.expect_close(ctx.call(u, c, 0.0), u, what='scale 0')\n\n"
        "@extra_check('classifier_free_guidance')\ndef always_fails(ctx):\n    ctx.fail('hidden "
        "failure')\n"
    )
    path = synthetic_notebook(
        tmp_path / "exercise.ipynb",
        [
            "def classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
            "    return eps_uncond + scale * (eps_cond - eps_uncond)"
        ],
        chapter="09",
    )
    report = grader.grade(path, exercises_only=True, extra_dir=str(hidden), chapter="09")
    others = {
        t.name: "missing" for t in chapter_module("09").TASKS
    }  # the notebook writes only one task
    assert statuses(report) == dict(
        others,
        **{
            "classifier_free_guidance": "passed",
            "classifier_free_guidance[more.py::scale_zero]": "passed",
            "classifier_free_guidance[more.py::always_fails]": "failed",
        },
    ), format_report(report)
    assert not report.ok

    (hidden / "typo.py").write_text(
        "from minisd.course.checks import extra_check\n\n"
        "@extra_check('classifier_free_guidence')\ndef check(ctx):\n    pass\n"
    )
    report = grader.grade(path, exercises_only=True, extra_dir=str(hidden), chapter="09")
    assert statuses(report)["classifier_free_guidance[typo.py]"] == "grader error"
    typo = next(t for t in report.tasks if t.get("check") == "typo.py")
    assert "no chapter has a graded task of that name" in typo["message"]


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


# ----------------------------------------------------------------------------------------------
# the tasks added for issue #15: one deliberately wrong variant each, graded per chapter in one go

NEW_WRONG = {
    "00": {
        "predict_eps": (
            "def predict_eps(x_t, x0, alpha_bar):\n"
            "    return (x_t - alpha_bar * x0) / (1 - alpha_bar)\n",
            "missing the square roots",
        ),
        "alphas_cumprod": (
            "def alphas_cumprod(betas):\n    return 1 - betas.cumsum(0)\n",
            "a product, not a sum",
        ),
    },
    "01": {
        "MultiHeadAttention": (
            "import torch\nfrom einops import rearrange\n"
            "class MultiHeadAttention(torch.nn.Module):\n"
            "    def __init__(self, query_dim, heads, head_dim, context_dim=None):\n"
            "        super().__init__()\n        self.heads = heads\n"
            "        self.to_q = torch.nn.Linear(query_dim, heads * head_dim, bias=False)\n"
            "        self.to_k = torch.nn.Linear(context_dim or query_dim, heads * head_dim, bias=False)\n"
            "        self.to_v = torch.nn.Linear(context_dim or query_dim, heads * head_dim, bias=False)\n"
            "        self.to_out = torch.nn.Linear(heads * head_dim, query_dim)\n"
            "    def forward(self, x, context=None):\n"
            "        c = x if context is None else context\n"
            "        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=self.heads)\n"
            "                   for t in (self.to_q(x), self.to_k(c), self.to_v(c)))\n"
            "        a = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v\n"
            "        return rearrange(a, 'b h n d -> b n (h d)')\n",
            "skips the output projection",
        ),
        "softmax_backward": (
            "def softmax_backward(probs, grad_probs):\n    return probs * grad_probs\n",
            "couples the entries of a row",
        ),
    },
    "02": {
        "layer_norm": (
            "def layer_norm(x, weight, bias, eps=1e-05):\n"
            "    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt()"
            " * weight + bias\n",
            "unbiased",
        ),
        "MyTransformerBlock": (
            "import torch\nfrom torch.nn import functional as F\nfrom minisd.attention import Attention\n"
            "class MyTransformerBlock(torch.nn.Module):\n"
            "    def __init__(self, dim, heads, head_dim, context_dim):\n"
            "        super().__init__()\n"
            "        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim) for _ in range(3))\n"
            "        self.attn1 = Attention(dim, heads, head_dim)\n"
            "        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)\n"
            "        self.ff = torch.nn.Module()\n        self.ff.geglu = torch.nn.Module()\n"
            "        self.ff.geglu.proj = torch.nn.Linear(dim, 8 * dim)\n"
            "        self.ff.proj_out = torch.nn.Linear(4 * dim, dim)\n"
            "    def forward(self, x, context):\n"
            "        x = self.norm1(x + self.attn1(x))\n"
            "        x = self.norm2(x + self.attn2(x, context))\n"
            "        value, gate = self.ff.geglu.proj(x).chunk(2, dim=-1)\n"
            "        return self.norm3(x + self.ff.proj_out(value * F.gelu(gate)))\n",
            "post-norm",
        ),
    },
    "03": {
        "MyResnetBlock": (
            "import torch\nfrom torch.nn import functional as F\n"
            "class MyResnetBlock(torch.nn.Module):\n"
            "    def __init__(self, in_channels, out_channels, time_dim, groups):\n"
            "        super().__init__()\n"
            "        self.norm1 = torch.nn.GroupNorm(groups, in_channels)\n"
            "        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)\n"
            "        self.time_emb_proj = torch.nn.Linear(time_dim, out_channels)\n"
            "        self.norm2 = torch.nn.GroupNorm(groups, out_channels)\n"
            "        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)\n"
            "        if in_channels != out_channels:\n"
            "            self.conv_shortcut = torch.nn.Conv2d(in_channels, out_channels, 1)\n"
            "    def forward(self, x, t_emb):\n"
            "        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(t_emb)[:, :, None, None]\n"
            "        h = self.conv2(F.silu(self.norm2(h)))\n"
            "        return (self.conv_shortcut(x) if hasattr(self, 'conv_shortcut') else x) + h\n",
            "without the SiLU",
        ),
        "group_norm_backward": (
            "def group_norm_backward(x, groups, grad_out, eps=1e-05):\n"
            "    xg = x.reshape(x.shape[0], groups, -1)\n"
            "    std = (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt()\n"
            "    return (grad_out.reshape(xg.shape) / std).reshape(x.shape)\n",
            "the mean and the variance depend on x",
        ),
    },
    "04": {
        "conv_output_size": (
            "def conv_output_size(size, kernel, stride, padding):\n"
            "    return -(-(size + 2 * padding - kernel) // stride) + 1\n",
            "round down",
        ),
        "receptive_field": (
            "def receptive_field(kernels, strides):\n    return 1 + sum(k - 1 for k in kernels)\n",
            "multiply by the strides",
        ),
    },
    "05": {
        "Posterior": (
            "import torch\nclass Posterior(torch.nn.Module):\n"
            "    def __init__(self, latent_channels):\n        super().__init__()\n"
            "        self.quant_conv = torch.nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)\n"
            "    def forward(self, h, noise):\n"
            "        mean, logvar = self.quant_conv(h).chunk(2, dim=1)\n"
            "        logvar = logvar.clamp(-30, 20)\n"
            "        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])\n"
            "        return mean + logvar.exp() * noise, kl\n",
            "standard deviation",
        ),
        "kl_gradients": (
            "import torch\ndef kl_gradients(mean, logvar):\n"
            "    return mean.clone(), torch.exp(logvar) - 1\n",
            "mind the ½",
        ),
    },
    "06": {
        "pad_ids": (
            "def pad_ids(ids, bos, eos, pad, length=77):\n"
            "    row = [bos, *ids, eos][:length]\n    return row + [pad] * (length - len(row))\n",
            "must still end with EOS",
        ),
        "causal_mask": (
            "import torch\ndef causal_mask(n):\n"
            "    return torch.ones(n, n, dtype=torch.bool).triu()\n",
            "transposed",
        ),
    },
    "07": {
        "mixture_oracle_eps": (
            "import torch\ndef mixture_oracle_eps(x_t, alpha_bar, means, stds, weights):\n"
            "    var = alpha_bar * stds ** 2 + 1 - alpha_bar\n"
            "    per = (1 - alpha_bar) ** 0.5 * (x_t[:, None] - alpha_bar ** 0.5 * means[None]) / var[None]\n"
            "    return (per * weights[None]).sum(-1)\n",
            "responsibilities",
        ),
    },
    "08": {
        "ddim_timesteps": (
            "def ddim_timesteps(num_steps, num_train_timesteps=1000):\n"
            "    step = num_train_timesteps // num_steps\n"
            "    return [i * step for i in reversed(range(num_steps))]\n",
            "steps_offset",
        ),
        "convergence_order": (
            "import numpy as np\ndef convergence_order(num_steps, errors):\n"
            "    return float(np.polyfit(np.log(num_steps), np.log(errors), 1)[0])\n",
            "minus the slope",
        ),
    },
    "09": {
        "composed_guidance": (
            "def composed_guidance(eps_uncond, eps_parts, weights, scale):\n"
            "    return eps_uncond + scale * (eps_parts - eps_uncond).sum(0)\n",
            "ignores the weights",
        ),
        "rescale_guidance": (
            "def rescale_guidance(eps_guided, eps_cond, phi):\n"
            "    r = eps_guided * eps_cond.std() / eps_guided.std()\n"
            "    return phi * r + (1 - phi) * eps_guided\n",
            "per image",
        ),
    },
    "10": {
        "conv1x1_to_linear": (
            "def conv1x1_to_linear(weight):\n    return weight[:, :, 0, 0].T\n",
            r"\[out, in\]",
        ),
        "rename_key": (
            "def rename_key(key, rules):\n"
            "    for old, new in rules:\n"
            "        if key.startswith(old):\n"
            "            return new + key[len(old):]\n"
            "    return None\n",
            "LONGEST",
        ),
    },
    "11": {
        "ema_update": (
            "def ema_update(ema, params, decay):\n"
            "    return [e * (1 - decay) + p * decay for e, p in zip(ema, params)]\n",
            "decay weighs the old",
        ),
        "train_scalar_denoiser": (
            "import torch\ndef train_scalar_denoiser(x0, alpha_bars, steps, lr, seed):\n"
            "    g = torch.Generator().manual_seed(seed)\n"
            "    c = torch.zeros(len(alpha_bars), requires_grad=True)\n"
            "    opt = torch.optim.SGD([c], lr=lr)\n    a = alpha_bars[:, None]\n"
            "    for _ in range(steps):\n"
            "        noise = torch.randn(len(alpha_bars), len(x0), generator=g)\n"
            "        x_t = a.sqrt() * x0[None] + (1 - a).sqrt() * noise\n"
            "        loss = ((c[:, None] * x_t - x0[None]) ** 2).mean()\n"
            "        opt.zero_grad(); loss.backward(); opt.step()\n"
            "    return c.detach()\n",
            "predict x₀",
        ),
    },
    "12": {
        "euler_step": (
            "def euler_step(x, denoised, sigma, sigma_next):\n"
            "    return x + (sigma - sigma_next) * (x - denoised) / sigma\n",
            "sign of the step is flipped",
        ),
        "dpmpp_2m_step": (
            "def dpmpp_2m_step(x, denoised, denoised_prev, sigma, sigma_next, sigma_prev=None):\n"
            "    ratio = sigma_next / sigma\n"
            "    return ratio * x - (ratio - 1) * denoised\n",
            "first order",
        ),
        "karras_sigmas": (
            "import torch\ndef karras_sigmas(sigma_min, sigma_max, n, rho=7.0):\n"
            "    ramp = torch.linspace(0, 1, n, dtype=torch.float64)\n"
            "    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)\n"
            "    return (lo + ramp * (hi - lo)) ** rho\n",
            "must descend",
        ),
    },
    "13": {
        "symmetric_infonce": (
            "import torch\nimport torch.nn.functional as F\n"
            "def symmetric_infonce(image_embeddings, text_embeddings, logit_scale):\n"
            "    u = F.normalize(image_embeddings, dim=-1)\n"
            "    v = F.normalize(text_embeddings, dim=-1)\n"
            "    logits = logit_scale * u @ v.T\n"
            "    return F.cross_entropy(logits, torch.arange(len(logits)))\n",
            "only asks each image to find its caption",
        ),
        "zero_shot_predict": (
            "def zero_shot_predict(image_embeddings, prompt_embeddings, prompt_class,\n"
            "                      num_classes):\n"
            "    return prompt_class[(image_embeddings @ prompt_embeddings.T).argmax(dim=1)]\n",
            "nearest single prompt",
        ),
        "eos_pooling": (
            "import torch.nn.functional as F\n"
            "def eos_pooling(states, ids, eos_token_id, projection):\n"
            "    sentence = states[range(len(ids)), ids.argmax(dim=1)]\n"
            "    return F.normalize(sentence @ projection.T, dim=-1)\n",
            "largest id of the vocabulary",
        ),
    },
}


@pytest.mark.parametrize("number", sorted(NEW_WRONG))
def test_new_tasks_wrong_variants_fail_naming_the_mistake(grader, tmp_path, number):
    variants = NEW_WRONG[number]
    path = with_function(
        assignment(number),
        tmp_path / "wrong.ipynb",
        {name: source for name, (source, _) in variants.items()},
    )
    report = grader.grade(path, exercises_only=True, seed=11, chapter=number)
    for name, (_, expected_message) in variants.items():
        assert statuses(report)[name] == "failed", format_report(report)
        assert re.search(expected_message, messages(report)[name]), format_report(report)


EOS_POOLING_WRONG = {
    "last position": (
        "states[:, -1]",
        "after the caption come padding tokens",
    ),
    "start-of-text": (
        "states[:, 0]",
        "has read nothing but itself",
    ),
    "not normalized": (
        "states[torch.arange(len(ids)), (ids == eos_token_id).int().argmax(dim=1)]",
        "not unit length",
    ),
}


@pytest.mark.parametrize("variant", sorted(EOS_POOLING_WRONG))
def test_eos_pooling_names_the_position_or_normalization_mistake(grader, tmp_path, variant):
    picked, expected_message = EOS_POOLING_WRONG[variant]
    finish = "out" if variant == "not normalized" else "F.normalize(out, dim=-1)"
    source = (
        "import torch\nimport torch.nn.functional as F\n"
        "def eos_pooling(states, ids, eos_token_id, projection):\n"
        f"    out = {picked} @ projection.T\n    return {finish}\n"
    )
    path = with_function(assignment("13"), tmp_path / "wrong.ipynb", {"eos_pooling": source})
    report = grader.grade(path, exercises_only=True, seed=5, chapter="13")
    assert statuses(report)["eos_pooling"] == "failed", format_report(report)
    assert expected_message in messages(report)["eos_pooling"], format_report(report)


def test_module_tasks_report_parameter_names_that_differ(grader, tmp_path):
    """ctx.call_module loads minisd's weights by name: a module with other names fails, naming them."""
    source = (
        "import torch\nclass Posterior(torch.nn.Module):\n"
        "    def __init__(self, latent_channels):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)\n"
        "    def forward(self, h, noise):\n        return h, h\n"
    )
    path = with_function(assignment("05"), tmp_path / "names.ipynb", {"Posterior": source})
    report = grader.grade(path, exercises_only=True, seed=1, chapter="05")
    assert statuses(report)["Posterior"] == "failed", format_report(report)
    message = messages(report)["Posterior"]
    assert "missing ['quant_conv.bias', 'quant_conv.weight']" in message
    assert "unexpected ['conv.bias', 'conv.weight']" in message


# ----------------------------------------------------------------------------------------------
# numeric questions drawn per student, and the open-ended project's scoring


def test_numeric_questions_are_drawn_per_student_and_checked(tmp_path, capsys):
    from minisd.course import questions as Q

    alpha = next(q for q in Q.QUESTIONS if q.qid == "alpha_bar")
    same = [Q.parameters_for("student-1", alpha) for _ in range(2)]
    assert same[0] == same[1]  # the same id always gets the same question
    drawn = {Q.parameters_for(f"student-{i}", alpha)["t"] for i in range(20)}
    assert len(drawn) > 10  # different ids get different inputs
    # independent reference (field guide): betas = linspace(√0.00085, √0.012, 1000)², ᾱ = cumprod(1 − β)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = Q.parameters_for("student-1", alpha)["t"]
    t_snr = Q.parameters_for("student-1", next(q for q in Q.QUESTIONS if q.qid == "snr"))["t"]
    right = {
        "alpha_bar": float(alphas_cumprod[t]),
        "snr": float(alphas_cumprod[t_snr] / (1 - alphas_cumprod[t_snr])),
    }
    assert all(r["status"] == "passed" for r in Q.check("student-1", "07", right))
    wrong = dict(right, alpha_bar=float(alphas_cumprod[t - 1]))
    results = {r["question"]: r["status"] for r in Q.check("student-1", "07", wrong)}
    assert results == {"alpha_bar": "failed", "snr": "passed"}
    results = {r["question"]: r for r in Q.check("student-1", "07", {"alpha_bar": "0.5"})}
    assert (
        results["alpha_bar"]["status"] == "failed"
        and "must be a number" in results["alpha_bar"]["message"]
    )
    assert results["snr"]["status"] == "not answered"

    # a transformer block's count, by the closed form of chapter 2's counting exercise
    block = next(q for q in Q.QUESTIONS if q.qid == "block_parameters")
    p = Q.parameters_for("student-1", block)
    d, i, c = p["dim"], p["heads"] * p["head_dim"], p["context_dim"]
    count = (
        (3 * d * i + i * d + d)
        + (d * i + 2 * c * i + i * d + d)
        + 3 * 2 * d
        + (d * 8 * d + 8 * d)
        + (4 * d * d + d)
    )
    assert Q.check("student-1", "02", {"block_parameters": count})[0]["status"] == "passed"

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(right), encoding="utf-8")
    assert (
        course_main(
            ["questions", "07", "--student", "student-1", "--answers", str(answers), "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["passed"] == 2
    answers.write_text("[1, 2", encoding="utf-8")
    assert (
        course_main(["questions", "07", "--student", "student-1", "--answers", str(answers)]) == 2
    )
    assert course_main(["questions", "99", "--student", "x"]) == 2
    assert "has no numeric questions" in capsys.readouterr().err


def test_project_scoring_rewards_right_pictures_and_reports_json(tmp_path, capsys):
    from minisd.course.project import HELDOUT_COUNT, PROMPT_SEED, score_images
    from minisd.train.evaluate import prompts_of
    from minisd.train.shapes_dataset import parse_prompt, render

    prompts = prompts_of("heldout", 6, PROMPT_SEED)
    assert len(prompts_of("heldout", HELDOUT_COUNT, PROMPT_SEED)) == HELDOUT_COUNT
    drawn = torch.stack(
        [
            torch.from_numpy(render(parse_prompt(p), image_size=32)).permute(2, 0, 1).float() / 255
            for p in prompts
        ]
    )
    perfect = score_images(drawn, prompts, "teacher")
    assert perfect["score"] == 1.0 and perfect["count"] == 6 and perfect["student"] == "teacher"
    assert score_images(torch.full_like(drawn, 0.5), prompts, "grey")["score"] == 0.0
    shuffled = score_images(
        drawn, prompts[1:] + prompts[:1], "shuffled"
    )  # pictures of other captions
    assert shuffled["score"] < 0.5
    json.dumps(perfect)  # a leaderboard line

    assert course_main(["project", str(tmp_path / "missing.safetensors"), "--student", "x"]) == 2
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    assert course_main(["project", str(broken), "--student", "x"]) == 2
    assert "cannot score" in capsys.readouterr().err
