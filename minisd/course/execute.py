"""Re-run notebooks in place, each in a fresh kernel, and save their outputs (the committed ones).

    python -m minisd.course execute                       # every notebooks/NN_*.ipynb, full size
    python -m minisd.course execute notebooks/01_attention.ipynb --fast

The kernel runs in the notebook's folder (notebooks/) with the environment as it is (PYTHONPATH
untouched, as in a student's Jupyter: notebooks put the checkout on sys.path themselves); --fast
sets MINISD_FAST=1. A cell that raises stops that notebook, which is then left unchanged on disk;
the exit status is 1 if any notebook failed. Cell timing metadata is not recorded, so re-running
changes only what the outputs change.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .build import NOTEBOOK_NAME, repo_root
from .kernel import kernel_env


@dataclass
class Execution:
    path: Path
    seconds: float
    error: Optional[str] = None  # first failing cell and its error, None on success
    notebook: object = None  # the executed notebook (with outputs)


def run_notebook(
    path, fast: bool, cell_timeout: float = 600, total_timeout: Optional[float] = None
) -> Execution:
    """Execute a notebook in a fresh kernel (cwd = its folder), stopping at the first error or when
    a cell runs past `cell_timeout` or the whole notebook past `total_timeout` seconds. Does not
    write anything."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    start = time.perf_counter()
    deadline = start + total_timeout if total_timeout else float("inf")
    error, index = None, 0
    try:
        with client.setup_kernel(env=kernel_env(fast, add_checkout_to_path=False)):
            for index, cell in enumerate(notebook.cells):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise CellTimeoutError(f"the notebook ran past its {total_timeout:g} s budget")
                client.timeout = int(max(1, min(cell_timeout, remaining)))
                client.execute_cell(cell, index)
    except CellExecutionError as failure:
        error = f"cell {index + 1}: {failure.ename}: {failure.evalue}\n{_tail(str(failure))}"
    except CellTimeoutError:
        limit = (
            "its time budget"
            if time.perf_counter() >= deadline
            else f"the {cell_timeout:g} s limit per cell"
        )
        seconds = time.perf_counter() - start
        error = (f"cell {index + 1} was still running when the notebook hit {limit} "
                 f"({seconds:.0f} s)")
    except DeadKernelError:
        error = f"the kernel died in cell {index + 1}"
    return Execution(path, time.perf_counter() - start, error, notebook)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().split("\n")[-lines:])


def default_notebooks() -> list[Path]:
    return sorted(
        p for p in (repo_root() / "notebooks").glob("*.ipynb") if NOTEBOOK_NAME.match(p.name)
    )


def main(args) -> int:
    import nbformat

    paths = [Path(p) for p in args.notebooks] or default_notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        run = run_notebook(path, fast=args.fast, cell_timeout=args.cell_timeout)
        if run.error:
            failed += 1
            print(
                f"{path}: FAILED after {run.seconds:.1f} s (not saved)\n  {run.error}", flush=True
            )
            continue
        # timestamps from earlier runs by other tools: noise in every diff
        for cell in run.notebook.cells:
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(run.notebook, path)
        print(f"{path}: {run.seconds:.1f} s, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    return 1 if failed else 0
