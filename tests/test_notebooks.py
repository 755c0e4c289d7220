"""Every chapter notebook runs top to bottom in a fresh kernel, in CI's fast mode, within its time
budget.

Each notebook gets its own fresh kernel (cwd = notebooks/, MINISD_FAST=1), so hidden state from
running cells out of order, or from another chapter, cannot make it pass. The committed outputs
(produced by `python -m minisd.course execute`) must be free of errors, and the folder must stay
small.
"""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from minisd.course.build import BEGIN, NOTEBOOK_NAME, find_regions  # noqa: E402
from minisd.course.execute import run_notebook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"
NOTEBOOKS = sorted(p for p in FOLDER.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
FAST_BUDGET_S = 90          # CI's limit per notebook with MINISD_FAST=1 (the writers aim for 45 s)
FOLDER_LIMIT_BYTES = 15e6
FIRST_CELL = ['import os', 'FAST = os.environ.get("MINISD_FAST") == "1"']

pytestmark = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks yet")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_fresh_kernel_in_fast_mode(path):
    run = run_notebook(path, fast=True, total_timeout=FAST_BUDGET_S + 10)
    assert run.error is None, f"{path.name} failed after {run.seconds:.0f} s: {run.error}"
    assert run.seconds <= FAST_BUDGET_S, \
        f"{path.name} took {run.seconds:.0f} s with MINISD_FAST=1 (budget {FAST_BUDGET_S} s)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_and_error_free(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(code)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed outputs contain errors: {errors}"
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, (f"{path.name}: code cells {unexecuted} have no outputs committed: run "
                            f"`python -m minisd.course execute {path.relative_to(ROOT)}`")
    tracebacks = [
        i
        for i, c in enumerate(code)
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
        and "Traceback (most recent call last)" in o.get("text", "")
    ]
    assert not tracebacks, f"{path.name}: cells {tracebacks} printed a traceback"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    first_lines = [line.strip() for line in code[0].source.split("\n")]
    assert [l.split("#")[0].strip() for l in first_lines[:2]] == FIRST_CELL, (
        f"{path.name}: the first code cell starts {first_lines[:2]}"
    )
    headings = [
        line.strip() for c in nb.cells if c.cell_type == "markdown" for line in c.source.split("\n")
    ]
    assert "## Summary" in headings and "## Exercises" in headings, (
        f"{path.name}: needs '## Summary' and '## Exercises' sections"
    )
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            find_regions(cell.source, f"{path.name} cell {i}")  # raises on malformed regions


def test_notebooks_folder_stays_small():
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert total < FOLDER_LIMIT_BYTES, (
        f"notebooks/ holds {total / 1e6:.1f} MB (limit {FOLDER_LIMIT_BYTES / 1e6:.0f} MB)"
    )
