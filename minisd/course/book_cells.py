"""Give the book's inserted cells (diagrams, figures, controls) their outputs, and nothing else.

    python -m minisd.course.book_cells notebooks/07_ddpm.ipynb [more notebooks]

The cells added for the book carry a tag starting with "book-" (`book-diagram`, `book-figure`,
`book-widget`) and are written to need only the notebook's first code cell (FAST and
`import minisd`). This runs, in one fresh kernel per notebook (cwd notebooks/, full size unless
MINISD_FAST=1 is set), that first cell and then the tagged cells, and writes back the outputs of
the tagged cells only: every other cell, its outputs and its execution count stay byte for byte
as they were, so the notebooks of several authors still merge. (`python -m minisd.course execute`
re-runs whole notebooks.)
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

TAG_PREFIX = "book-"


def is_book_cell(cell) -> bool:
    return any(tag.startswith(TAG_PREFIX) for tag in cell.get("metadata", {}).get("tags", []))


def run(path: Path) -> int:
    import nbformat
    from nbclient import NotebookClient

    from .kernel import kernel_env

    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i in code if is_book_cell(nb.cells[i])]
    if not tagged:
        print(f"{path.name}: no book- cells")
        return 0
    scratch = nbformat.v4.new_notebook(metadata=copy.deepcopy(nb.metadata))
    scratch.cells = [copy.deepcopy(nb.cells[i]) for i in [code[0]] + tagged]
    client = NotebookClient(scratch, kernel_name="python3", timeout=600, record_timing=False,
                            allow_errors=False, resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    fast = os.environ.get("MINISD_FAST") == "1"
    with client.setup_kernel(env=kernel_env(fast, add_checkout_to_path=False)):
        for index, cell in enumerate(scratch.cells):
            client.execute_cell(cell, index)
    for i, done in zip(tagged, scratch.cells[1:]):
        nb.cells[i].outputs = done.outputs
        nb.cells[i].execution_count = done.execution_count
    nbformat.write(nb, path)
    print(f"{path.name}: {len(tagged)} book cells executed")
    return 0


if __name__ == "__main__":
    sys.exit(max([run(Path(p).resolve()) for p in sys.argv[1:]] or [0]))
