"""`python -m minisd.course site OUT/`: the book as a static website, readable offline.

Every chapter notebook (`notebooks/NN_name.ipynb`) becomes `OUT/NN_name.html` with its committed
outputs (nothing is re-executed), figures embedded in the page, math typeset by MathJax 3 and a
chapter list on every page; `notebooks/README.md` (the on-ramp: prerequisites, reading order,
glossary) becomes `OUT/index.html`. Open `OUT/index.html` from a disk or a file share: no server,
no network.

The pages come from nbconvert, the converter Jupyter itself ships, with its JupyterLab page
template extended by `site_template/minisd_book/index.html.j2` (navigation; no script from a
CDN). MathJax 3's one-file SVG build (`es5/tex-svg-full.js`: formulas drawn as SVG paths, so no
font files and no further downloads) is copied from the PyPI package `django-static-mathjax` (an
unmodified copy of MathJax 3.2.2, Apache 2.0; only its files are used, not Django) into
`OUT/_static/mathjax/`. Both packages are needed only to build the site:
`pip install nbconvert django-static-mathjax` (both in `tests/requirements-test.txt`).

Links are rewritten for the site: `README.md#glossary` -> `index.html#glossary`, `07_ddpm.ipynb`
-> `07_ddpm.html`. Interactive controls (ipywidgets) need a live kernel: the site shows the
static picture saved beside them, and drops their saved widget state (its renderer would come
from a CDN).
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .build import NOTEBOOK_NAME

TEMPLATE_DIR = Path(__file__).with_name("site_template")
TEMPLATE_NAME = "minisd_book"
STATIC = "_static"
MATHJAX_SCRIPT = "tex-svg-full.js"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
LINK = re.compile(r"(\]\(|href=\")([^)\"#\s]*)(#[^)\"\s]*)?")


@dataclass(frozen=True)
class Page:
    file: str  # e.g. "07_ddpm.html"
    title: str  # e.g. "Chapter 7 · Noise schedules and DDPM"


def chapter_notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))


def notebook_title(nb, fallback: str) -> str:
    """The first `# heading` of the notebook's first markdown cell."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
            break
    return fallback


def rewrite_link(target: str) -> str:
    """A link of a notebook or of README.md, as it must read on the site."""
    if target in ("README.md", "./README.md"):
        return "index.html"
    name = target[2:] if target.startswith("./") else target
    if NOTEBOOK_NAME.match(name):
        return name[: -len(".ipynb")] + ".html"
    return target


def rewrite_links(markdown: str) -> str:
    return LINK.sub(lambda m: m.group(1) + rewrite_link(m.group(2)) + (m.group(3) or ""), markdown)


def prepare(nb):
    """A copy of the notebook as the site shows it: links rewritten, live widgets left as text."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = rewrite_links(cell.source)
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data and WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                data.setdefault("text/plain", "")
    return nb


def mathjax_folder() -> Path:
    """MathJax 3's distribution, from the PyPI package django-static-mathjax (import `mathjax`)."""
    try:
        import mathjax
    except ImportError as error:
        raise SystemExit(
            "error: the site needs MathJax: pip install django-static-mathjax"
        ) from error
    folder = Path(mathjax.__file__).with_name("static") / "mathjax"
    if not (folder / "es5" / MATHJAX_SCRIPT).is_file():
        raise SystemExit(
            f"error: no es5/{MATHJAX_SCRIPT} in {folder}: pip install django-static-mathjax"
        )
    return folder


def copy_static(out: Path) -> None:
    static = out / STATIC
    source = mathjax_folder()
    (static / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "es5" / MATHJAX_SCRIPT, static / "mathjax" / MATHJAX_SCRIPT)
    shutil.copy2(source / "LICENSE", static / "mathjax" / "LICENSE")
    shutil.copy2(TEMPLATE_DIR / "book.css", static / "book.css")


def make_exporter():
    try:
        from nbconvert import HTMLExporter
    except ImportError as error:
        raise SystemExit("the site is built with nbconvert: pip install nbconvert") from error
    exporter = HTMLExporter(
        template_name=TEMPLATE_NAME, extra_template_basedirs=[str(TEMPLATE_DIR)]
    )
    exporter.mathjax_url = f"{STATIC}/mathjax/{MATHJAX_SCRIPT}"
    exporter.exclude_anchor_links = False
    return exporter


def index_notebook(readme: Path, pages: list[Page]):
    """The home page: the on-ramp (notebooks/README.md) as a one-cell notebook."""
    import nbformat

    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
    else:
        text = "# minisd · the book\n\n" + "\n".join(f"1. [{p.title}]({p.file})" for p in pages)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(rewrite_links(text)))
    nb.metadata["title"] = "minisd · the book"
    return nb


def build_site(out: Path, notebooks: Path) -> list[Path]:
    """Write the site into `out` (created if needed); return the pages written, home page first."""
    import nbformat

    paths = chapter_notebooks(notebooks)
    if not paths:
        raise SystemExit(f"no chapter notebooks (NN_name.ipynb) in {notebooks}")
    out.mkdir(parents=True, exist_ok=True)
    copy_static(out)
    books = [nbformat.read(path, as_version=4) for path in paths]
    home = Page("index.html", "Start here: the on-ramp")
    pages = [home] + [
        Page(p.stem + ".html", notebook_title(nb, p.stem)) for p, nb in zip(paths, books)
    ]
    exporter = make_exporter()
    notebooks_by_page = [index_notebook(notebooks / "README.md", pages)] + [
        prepare(nb) for nb in books
    ]
    written = []
    for i, (page, nb) in enumerate(zip(pages, notebooks_by_page)):
        nb.metadata["title"] = page.title
        resources = {
            "book": {
                "pages": pages,
                "current": page.file,
                "static": STATIC,
                "previous": pages[i - 1] if i > 0 else None,
                "next": pages[i + 1] if i + 1 < len(pages) else None,
            },
            "metadata": {"name": page.title},
        }
        html, _ = exporter.from_notebook_node(nb, resources=resources)
        path = out / page.file
        path.write_text(html, encoding="utf-8")
        written.append(path)
    return written


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(args) -> int:
    out = Path(args.out)
    notebooks = Path(args.notebooks)
    if out.exists() and not out.is_dir():
        print(f"error: {out} exists and is not a folder", file=sys.stderr)
        return 2
    if not notebooks.is_dir():
        print(f"error: no notebooks folder {notebooks}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pages = build_site(out, notebooks)
    seconds = time.perf_counter() - start
    print(
        f"wrote {len(pages)} pages to {out}/ ({folder_size(out) / 1e6:.1f} MB, {seconds:.1f} s); "
        f"open {out / 'index.html'} in a browser"
    )
    return 0
