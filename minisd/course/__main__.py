"""python -m minisd.course build|grade|execute|site|handout|guide|project|questions (see --help of
each)."""
from __future__ import annotations

import argparse
import sys

from . import grade as grading

DESCRIPTION = """\
The minisd course: chapters/ for students, generated from notebooks/, and the autograder.

  build    notebooks/NN_name.ipynb -> chapters/NN_name/{assignment.ipynb, README.md}
           (+ chapters/README.md)
  grade    run a student's notebook (or a class's folder) in a sandbox, check each graded function
  execute  re-run notebooks in place in fresh kernels, saving their outputs
  handout  OUT/: exactly the student files of every chapter (what build writes to chapters/)
  guide    OUT/: the instructor's guide (solutions, reference answers, rubrics, time per task): never hand it out
  project  score a submission of the open-ended project (see minisd/course/project.py)
  questions  a student's numeric questions (inputs drawn from the student id), and checking the answers
  site     notebooks/ -> OUT/*.html: the book as a static website (outputs, math, navigation)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisd.course", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(
        dest="command", metavar="{build,grade,execute,site,handout,guide,project,questions}"
    )

    build = commands.add_parser(
        "build",
        help="generate chapters/ from notebooks/",
        description="Generate chapters/ from notebooks/ (deterministic: same notebooks, "
        "same bytes).",
    )
    build.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if chapters/ is out of date with notebooks/ (for CI)",
    )

    grade = commands.add_parser(
        "grade",
        help="grade a notebook, or a folder of them",
        description=grading.__doc__,
        epilog=grading.EXTRA_CHECKS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grade.add_argument(
        "notebook",
        help="the notebook to grade (e.g. chapters/01_attention/assignment.ipynb), "
        "or a folder of students' notebooks",
    )
    grade.add_argument("--json", action="store_true", help="print a machine-readable report")
    grade.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the random inputs (default: fresh each run)",
    )
    grade.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="time limit per check (default 60 s)",
    )
    grade.add_argument(
        "--cell-timeout",
        type=float,
        default=None,
        metavar="S",
        help="time limit per notebook cell (default 120 s, 600 s with --full-size)",
    )
    grade.add_argument(
        "--notebook-timeout",
        type=float,
        default=None,
        metavar="S",
        help="time limit for running the whole notebook (default 900 s, 3600 s with --full-size)",
    )
    grade.add_argument(
        "--extra-checks", metavar="DIR", default=None, help="a folder of instructors' hidden checks"
    )
    grade.add_argument(
        "--exercises-only",
        action="store_true",
        help="run only the imports, definitions and exercise cells (much faster)",
    )
    grade.add_argument(
        "--full-size", action="store_true", help="run the notebook without MINISD_FAST=1"
    )
    grade.add_argument(
        "--chapter",
        default=None,
        metavar="NN",
        help="the chapter number, when the notebook's (or folder's) name does not tell",
    )
    grade.add_argument(
        "--isolation",
        choices=["auto", "bubblewrap", "process"],
        default="auto",
        help="auto (default): bubblewrap where it works, else a plain process (weaker, see "
        "README); bubblewrap: refuse to grade without it",
    )
    grade.add_argument(
        "--memory-mb",
        type=int,
        default=4096,
        metavar="MB",
        help="address-space limit of each sandbox (default 4096)",
    )
    grade.add_argument(
        "--csv",
        metavar="FILE",
        default=None,
        help="folder grading: write one row per student and task to FILE",
    )
    grade.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="folder grading: grade N notebooks at once (default 1)",
    )

    execute = commands.add_parser("execute", help="re-run notebooks in place, saving outputs",
                                  description="Re-run notebooks (default: all of notebooks/) in fresh kernels and "
                                              "save their outputs. Fails if any cell raises.")
    execute.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/NN_*.ipynb)")
    execute.add_argument("--fast", action="store_true", help="set MINISD_FAST=1 (small sizes, few steps)")
    execute.add_argument("--cell-timeout", type=float, default=600.0, metavar="S", help="per cell (default 600 s)")
    for name, text in (("handout", "write exactly the student files of every chapter into OUT"),
                       ("guide", "write the instructor's guide, one file per chapter, into OUT")):
        sub = commands.add_parser(name, help=text, description=text + ".")
        sub.add_argument("out", metavar="OUT", help="a folder (created if missing; must not be inside chapters/ "
                                                    "for the guide)")

    project = commands.add_parser("project", help="score the open-ended project",
                                  description="Score a trained model checkpoint on the held-out prompts with the "
                                              "prompt-fidelity detector and print the leaderboard JSON.")
    project.add_argument("checkpoint", help="a minisd .safetensors file (the student's trained model)")
    project.add_argument("--student", required=True, help="the student's id (goes into the JSON)")
    project.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    project.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default 20)")

    from .questions import __doc__ as questions_doc
    questions = commands.add_parser("questions", help="numeric questions drawn per student, and their check",
                                    description=questions_doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    questions.add_argument("chapter", help="two digits, e.g. 07")
    questions.add_argument("--student", required=True, help="the student's id (seeds the question inputs)")
    questions.add_argument("--answers", default=None, help="a JSON file {question id: number} to check")
    questions.add_argument("--json", action="store_true", help="print the check as JSON")

    site = commands.add_parser(
        "site", help="build the book's static website",
        description="Write the chapters, with their committed outputs, as static HTML pages that "
                    "work offline (MathJax bundled). Needs nbconvert and django-static-mathjax.")
    site.add_argument("out", help="the folder to write (created if needed), e.g. site/")
    site.add_argument("--notebooks", default="notebooks",
                      help="the chapters' folder (default notebooks/)")
    return parser


def _write_folder(args, kind: str) -> int:
    from pathlib import Path

    from . import guide
    from .build import BuildError, repo_root
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        print(f"error: {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    chapters = (repo_root() / "chapters").resolve()
    if kind == "guide" and (out == chapters or chapters in out.parents):
        print(f"error: the guide must not go inside chapters/ (students get that folder): {args.out}",
              file=sys.stderr)
        return 2
    try:
        written = guide.write_guide(out) if kind == "guide" else guide.write_handout(out)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(written)} files written")
    return 0


def main(argv=None) -> int:
    # reports use √, ᾱ, ✔: never crash on a terminal that cannot show them
    for stream in (sys.stdout, sys.stderr):
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
        if args.jobs < 1 or args.memory_mb < 256:
            parser.error("--jobs must be at least 1 and --memory-mb at least 256")
        from .batch import main as grade_main

        return grade_main(args)
    if args.command == "execute":
        from .execute import main as execute_main

        return execute_main(args)
    if args.command in ("handout", "guide"):
        return _write_folder(args, args.command)
    if args.command == "questions":
        from .questions import main as questions_main
        return questions_main(args)
    if args.command == "project":
        from .project import main as project_main
        return project_main(args)
    if args.command == "site":
        from .site import main as site_main
        return site_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
