"""python -m minisd.course build|grade|execute|site (see --help of each)."""
from __future__ import annotations

import argparse
import sys

from . import grade as grading

DESCRIPTION = """\
The minisd course: chapters/ for students, generated from notebooks/, and the autograder.

  build    notebooks/NN_name.ipynb -> chapters/NN_name/{assignment.ipynb, README.md} (+ chapters/README.md)
  grade    run a student's notebook in a fresh kernel and check each graded function
  execute  re-run notebooks in place in fresh kernels, saving their outputs
  site     notebooks/ -> OUT/*.html: the book as a static website (outputs, math, navigation)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisd.course", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{build,grade,execute,site}")

    build = commands.add_parser("build", help="generate chapters/ from notebooks/",
                                description="Generate chapters/ from notebooks/ (deterministic: same notebooks, "
                                            "same bytes).")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 if chapters/ is out of date with notebooks/ (for CI)")

    grade = commands.add_parser("grade", help="grade a notebook", description=grading.__doc__,
                                epilog=grading.EXTRA_CHECKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    grade.add_argument("notebook", help="the notebook to grade, e.g. chapters/01_attention/assignment.ipynb")
    grade.add_argument("--json", action="store_true", help="print a machine-readable report")
    grade.add_argument("--seed", type=int, default=None, help="seed for the random inputs (default: fresh each run)")
    grade.add_argument("--timeout", type=float, default=60.0, metavar="S", help="time limit per check (default 60 s)")
    grade.add_argument("--cell-timeout", type=float, default=None, metavar="S",
                       help="time limit per notebook cell (default 120 s, 600 s with --full-size)")
    grade.add_argument("--extra-checks", metavar="DIR", default=None, help="a folder of instructors' hidden checks")
    grade.add_argument("--exercises-only", action="store_true",
                       help="run only the imports, definitions and exercise cells (much faster)")
    grade.add_argument("--full-size", action="store_true", help="run the notebook without MINISD_FAST=1")
    grade.add_argument("--chapter", default=None, metavar="NN",
                       help="the chapter number, when the notebook's name and metadata do not tell")

    execute = commands.add_parser("execute", help="re-run notebooks in place, saving outputs",
                                  description="Re-run notebooks (default: all of notebooks/) in fresh kernels and "
                                              "save their outputs. Fails if any cell raises.")
    execute.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/NN_*.ipynb)")
    execute.add_argument("--fast", action="store_true", help="set MINISD_FAST=1 (small sizes, few steps)")
    execute.add_argument("--cell-timeout", type=float, default=600.0, metavar="S", help="per cell (default 600 s)")

    site = commands.add_parser(
        "site", help="build the book's static website",
        description="Write the chapters, with their committed outputs, as static HTML pages that "
                    "work offline (MathJax bundled). Needs nbconvert and django-static-mathjax.")
    site.add_argument("out", help="the folder to write (created if needed), e.g. site/")
    site.add_argument("--notebooks", default="notebooks",
                      help="the chapters' folder (default notebooks/)")
    return parser


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # reports use √, ᾱ, ✔: never crash on a terminal that cannot show them
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "build":
        from .build import build
        return build(check=args.check)
    if args.command == "grade":
        if args.chapter is not None and not (len(args.chapter) == 2 and args.chapter.isdigit()):
            parser.error(f"--chapter must be two digits like 01, got {args.chapter!r}")
        return grading.main(args)
    if args.command == "execute":
        from .execute import main as execute_main
        return execute_main(args)
    if args.command == "site":
        from .site import main as site_main
        return site_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
