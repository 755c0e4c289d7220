"""Grade a class at once: every student's notebook in a folder, each in its own sandbox, one CSV.

    python -m minisd.course grade submissions/ --chapter 01 --csv grades.csv --jobs 2

The folder holds one notebook per student: `submissions/alice.ipynb` (the student is "alice") or
`submissions/alice/<anything>.ipynb` (one notebook in the student's folder). The chapter comes from
--chapter, or from the folder's name (submissions/01_attention/); never from the notebooks. --jobs N
grades N notebooks at once, each through its own Grader (its own sandboxes; under root its own uid),
so a hostile or broken submission costs at most its own time limits and cannot touch another's. One
CSV row per student × task (hidden checks included); a summary at the end. The exit status is 0 when
every student passed every task.

`main` is the `grade` command itself: one notebook (grade.py) or a folder of them (here).
"""

from __future__ import annotations

import csv
import json
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .build import chapter_number
from .grade import Grader, Report, UsageError, format_report
from .grade import grade as grade_one
from .sandbox import Limits

FIELDS = ["student", "notebook", "chapter", "task", "check", "status", "message", "seconds"]


def find_submissions(folder: Path) -> list[tuple[str, Path]]:
    """[(student, notebook)] sorted by student; a student folder with several notebooks is a usage
    error."""
    found = [(p.stem, p) for p in sorted(folder.glob("*.ipynb"))]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        notebooks = sorted(q for q in sub.glob("*.ipynb") if not q.name.startswith("."))
        if len(notebooks) > 1:
            raise UsageError(f"{sub} holds {len(notebooks)} notebooks; keep one per student")
        found += [(sub.name, notebooks[0])] if notebooks else []
    students = [s for s, _ in found]
    duplicates = sorted({s for s in students if students.count(s) > 1})
    if duplicates:
        raise UsageError(f"more than one notebook for {', '.join(duplicates)}")
    return sorted(found)


def grade_folder(args, limits) -> int:
    folder = Path(args.notebook)
    submissions = find_submissions(folder)
    if not submissions:
        raise UsageError(
            f"{folder}: no notebooks in it (expected NAME.ipynb or NAME/notebook.ipynb)"
        )
    chapter = args.chapter or chapter_number(folder / "x.ipynb")
    if chapter is None:
        raise UsageError(f"cannot tell which chapter {folder} is: pass --chapter NN")
    if args.jobs > 1:
        import torch

        # the checks' reference computations are tiny; jobs share the cores
        torch.set_num_threads(1)
    slots: "queue.Queue" = queue.Queue()
    graders = [
        Grader(
            fast=not args.full_size,
            cell_timeout=args.cell_timeout,
            notebook_timeout=args.notebook_timeout,
            isolation=args.isolation,
            limits=limits,
            slot=i,
            prewarm=args.jobs == 1,
        )
        for i in range(args.jobs)
    ]
    for grader in graders:
        slots.put(grader)

    def grade_one(item):
        student, path = item
        grader = slots.get()
        try:
            return student, grader.grade(
                path,
                seed=args.seed,
                timeout=args.timeout,
                extra_dir=args.extra_checks,
                exercises_only=args.exercises_only,
                chapter=chapter,
            )
        except UsageError as error:
            return student, Report(
                notebook=str(path), chapter=chapter, fatal=True, problems=[str(error)]
            )
        except Exception as error:  # noqa: BLE001 - a grader bug in one notebook: not the class
            problem = f"internal grader error, please report it: {type(error).__name__}: {error}"
            return student, Report(notebook=str(path), chapter=chapter, fatal=True,
                                   problems=[problem])
        finally:
            slots.put(grader)

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = []
            for student, report in pool.map(grade_one, submissions):
                results.append((student, report))
                print(
                    f"{student}: {report.passed}/{len(report.tasks)} passed ({report.seconds:.0f} "
                    "s)"
                    + ("; " + report.problems[0] if report.problems else ""),
                    flush=True,
                )
    finally:
        for grader in graders:
            grader.close()
    seconds = time.perf_counter() - start
    if args.csv:
        write_csv(Path(args.csv), results)
    print(summary(results, seconds, args.jobs, graders[0].isolation.description))
    return 0 if all(report.ok for _, report in results) else 1


def write_csv(path: Path, results: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        for student, report in results:
            rows = report.tasks or [
                {
                    "task": "",
                    "check": "",
                    "status": "not graded",
                    "seconds": 0.0,
                    "message": "; ".join(report.problems),
                }
            ]
            for task in rows:
                writer.writerow(
                    {
                        "student": _csv_safe(student),
                        "notebook": _csv_safe(report.notebook),
                        "chapter": report.chapter,
                        "task": task["task"],
                        "check": task.get("check", ""),
                        "status": task["status"],
                        "message": _csv_safe(task.get("message", "")),
                        "seconds": task.get("seconds", 0.0),
                    }
                )


def _csv_safe(text: str) -> str:
    """Messages quote student text: never let a spreadsheet read one as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def summary(results: list, seconds: float, jobs: int, isolation: str) -> str:
    total = len(results)
    full = sum(report.ok for _, report in results)
    lines = [
        f"Graded {total} notebooks in {seconds:.0f} s ({seconds / max(total, 1):.1f} s each, "
        f"{jobs} at once); "
        f"{full} passed every task.",
        f"Isolation: {isolation}",
    ]
    per_task: dict = {}
    for _, report in results:
        for task in report.tasks:
            key = task["task"] + (f" [{task['check']}]" if task.get("check") else "")
            passed, count = per_task.get(key, (0, 0))
            per_task[key] = (passed + (task["status"] == "passed"), count + 1)
    for key, (passed, count) in per_task.items():
        lines.append(f"  {key}: {passed}/{count} passed")
    broken = [student for student, report in results if report.fatal or not report.tasks]
    if broken:
        lines.append(f"  not graded (unreadable notebook or no sandbox): {', '.join(broken)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run: python -m minisd.course grade FOLDER --csv FILE")

def main(args) -> int:
    try:
        limits = Limits(memory_mb=args.memory_mb)
        if Path(args.notebook).is_dir():
            return grade_folder(args, limits)
        if args.csv or args.jobs != 1:
            raise UsageError("--csv and --jobs are for grading a folder of notebooks")
        report = grade_one(
            args.notebook,
            seed=args.seed,
            timeout=args.timeout,
            cell_timeout=args.cell_timeout,
            extra_dir=args.extra_checks,
            exercises_only=args.exercises_only,
            fast=not args.full_size,
            chapter=args.chapter,
            isolation=args.isolation,
            limits=limits,
            notebook_timeout=args.notebook_timeout,
        )
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the grader reports, it does not crash
        report = Report(
            notebook=str(args.notebook),
            fatal=True,
            problems=[f"internal grader error, please report it: {type(error).__name__}: {error}"],
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
