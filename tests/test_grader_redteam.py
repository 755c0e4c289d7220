"""Red team: hostile notebooks (tests/redteam/*.py) graded as a class, the way a teacher would, on
this machine.

One batch grading (`grade submissions/ --jobs 2 --csv`, a separate process, as a teacher runs it) of
every attack plus an honest classmate, with instructors' hidden checks whose source holds a secret;
then, in the same folder, an honest-but-wrong and a correct submission graded one by one. The tests
then check that no attack passed, the later submissions got their usual verdicts, the secret is in
no report, no attack process survived, no file outside the submissions changed, and a --json report
is not rewritten after the grader exits.

Needs the bubblewrap sandbox (the default on Linux with `bwrap`; CI installs it): the process-only
fallback is documented as weaker, and some attacks (kill -9 -1) would hit the test runner itself
there.

Cost: ~20 notebooks, 2 at a time. The limits below are small so that the hanging attacks end
quickly: a cell gets 10 s (honest cells here take well under 1 s even on a loaded 2-core machine;
the first cell imports torch, already imported by the sandbox), a check 15 s (the chapter-09 check
makes 3 calls on tiny tensors, ~10 ms each), the whole notebook 60 s.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from minisd.course.sandbox import FIRST_UID, Isolation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = sorted((ROOT / "tests" / "redteam").glob("*.py"))
# made here, so no file an attack can read holds them
SECRET = "SECRET-HIDDEN-" + os.urandom(6).hex()
CLASSMATE_SECRET = "SECRET-CLASSMATE-" + os.urandom(6).hex()
LIMITS = ["--timeout", "15", "--cell-timeout", "10", "--notebook-timeout", "60"]
CORRECT = (
    "def classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
    "    return eps_uncond + scale * (eps_cond - eps_uncond)\n"
)
WRONG = (
    "def classifier_free_guidance(eps_uncond, eps_cond, scale):\n"
    "    return eps_cond + scale * (eps_uncond - eps_cond)\n"
)
HIDDEN = f'''"""Hidden checks. {SECRET}"""
from minisd.course.checks import extra_check


@extra_check("classifier_free_guidance")
def secret_scale_two(ctx):
    # {SECRET}: the expected value is computed here, in the grader
    u, c = ctx.randn(2, 4, 3, 3), ctx.randn(2, 4, 3, 3)
    # the message text is the teacher's own: it may appear in reports
    ctx.expect_close(ctx.call(u, c, 2.0), u + 2.0 * (c - u), what="scale 2")
'''

pytestmark = pytest.mark.skipif(
    Isolation.detect().level != "bubblewrap",
    reason="needs the bubblewrap sandbox (apt-get install bubblewrap)",
)


def notebook(path: Path, source: str, metadata: dict | None = None) -> Path:
    """A notebook from a percent-format script: cells separated by lines starting with '# %%'."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata.update(metadata or {})
    nb.cells = [
        nbformat.v4.new_code_cell(cell.strip("\n"))
        for cell in re.split(r"^# %%.*$", source, flags=re.M)
        if cell.strip()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def grade_cli(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minisd.course", "grade", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(*folders: Path) -> dict:
    """path -> (size, mtime) for every file under the folders (no caches)."""
    state = {}
    for folder in folders:
        for path in folder.rglob("*") if folder.is_dir() else []:
            if "__pycache__" in path.parts or ".pytest_cache" in path.parts or not path.is_file():
                continue
            stat = path.stat()
            state[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return state


def sandbox_processes() -> list[str]:
    """Processes that belong to a sandbox or an attack: a sandbox uid, the worker, or REDTEAM in the
    command."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uid = int(re.search(r"^Uid:\s+(\d+)", (entry / "status").read_text(), re.M).group(1))
        except (OSError, AttributeError):
            continue
        if (
            FIRST_UID <= uid < FIRST_UID + 64
            or "REDTEAM" in command
            or "course/worker.py" in command
        ):
            found.append(f"{entry.name} uid {uid}: {command[:120]}")
    return found


class Listener:
    """A TCP server on the grading machine's loopback that records any connection."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.5)
        self.port, self.connections, self.running = self.server.getsockname()[1], 0, True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.server.accept()
                self.connections += 1
                connection.close()
            except OSError:
                continue

    def stop(self):
        self.running = False
        self.thread.join()
        self.server.close()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("class")
    submissions, hidden = base / "submissions", base / "hidden"
    hidden.mkdir()
    (hidden / "secret_checks.py").write_text(HIDDEN)
    listener = Listener()
    for script in ATTACKS:
        source = script.read_text().replace("{port}", str(listener.port))
        metadata = {"minisd": {"chapter": "00"}} if script.stem == "metadata_chapter" else None
        if script.stem != "shortcut_fused":
            notebook(submissions / f"{script.stem}.ipynb", source, metadata)
    notebook(
        submissions / "classmate" / "homework.ipynb",
        f"# {CLASSMATE_SECRET}\nimport torch\n# %%\n{CORRECT}",
    )
    watched = [ROOT / "minisd", ROOT / "tests", hidden]
    # shared folders other people's work changes too: only their entries (a .pth, a torch/ planted
    # there)
    shared = [
        Path(nbformat.__file__).parents[1],
        Path(os.__file__).parent,
        Path("/tmp"),
        Path.home(),
    ]
    names_before = {str(p): {q.name for q in p.iterdir()} for p in shared}
    before = snapshot(*watched)
    sub_before = snapshot(submissions)
    processes_before = sandbox_processes()

    start = time.perf_counter()
    batch = grade_cli(
        submissions,
        "--chapter",
        "09",
        "--jobs",
        "2",
        "--csv",
        base / "grades.csv",
        "--extra-checks",
        hidden,
        *LIMITS,
    )
    batch_seconds = time.perf_counter() - start
    rows = list(csv.DictReader(open(base / "grades.csv", encoding="utf-8")))

    # a --json report saved by the teacher, then left alone while an attack's daemons would act
    # (they wait 3 s)
    daemons = grade_cli(submissions / "daemons.ipynb", "--chapter", "09", "--json", *LIMITS)
    report_file = base / "daemons.json"
    report_file.write_text(daemons.stdout)
    time.sleep(5)

    later = {}
    for name, source in (("zz_wrong", WRONG), ("zz_correct", CORRECT)):
        path = notebook(submissions / f"{name}.ipynb", "import torch\n# %%\n" + source)
        result = grade_cli(path, "--chapter", "09", "--json", "--extra-checks", hidden, *LIMITS)
        later[name] = json.loads(result.stdout)
    listener.stop()
    yield {
        "batch": batch,
        "rows": rows,
        "later": later,
        "seconds": batch_seconds,
        "report_file": report_file,
        "daemons": daemons,
        "before": before,
        "after": snapshot(*watched),
        "new_names": {
            name for p in shared for name in {q.name for q in p.iterdir()} - names_before[str(p)]
        },
        "sub_before": sub_before,
        "sub_after": snapshot(submissions),
        "listener": listener,
        "processes_before": processes_before,
        "processes_after": sandbox_processes(),
    }


TASK = "classifier_free_guidance"  # the task every attack goes for (chapter 09 has others)


def rows_of(graded, student):
    """The CSV rows of `student`'s attacked task (chapter 09's other tasks are just missing)."""
    rows = [r for r in graded["rows"] if r["student"] == student]
    assert rows, graded["batch"].stdout + graded["batch"].stderr
    return [r for r in rows if r["task"] == TASK]


def attacked_task(report):
    """The entries of a --json report for the attacked task (the public and the hidden check)."""
    return [t for t in report["tasks"] if t["task"] == TASK]


@pytest.mark.parametrize("attack", [p.stem for p in ATTACKS if p.stem != "shortcut_fused"])
def test_no_attack_passes(graded, attack):
    # graded as chapter 09, whatever it claims
    assert all(r["chapter"] == "09" for r in graded["rows"] if r["student"] == attack)
    rows = rows_of(graded, attack)
    assert len(rows) == 2, rows  # the public check and the hidden one, each reported
    assert not all(r["status"] == "passed" for r in rows), rows
    # that one computes the public answer honestly, then kills the hidden check
    if attack != "exits_on_hidden":
        assert all(r["status"] != "passed" for r in rows), rows


EXPECTED = {  # attack -> the status of the public check, and a pattern of its message
    "metadata_chapter": ("missing", r"is not defined"),
    "stubborn_loops": ("timed out", r""),
    # forked copies of the worker answer on the shared channel (the sandbox is replaced, the cell
    # skipped), the 1 GiB reply is refused on either side: whichever comes first, never a pass
    "resources": ("crashed|failed|error", r""),
    "odd_returns": ("failed", r"to be a torch.Tensor, got Anything"),
    "fake_results": (
        "error",
        r"^ValueError: ✔ classifier_free_guidance passed Score: 9/9 passed .*FAKE-MESSAGE",
    ),
    "forge_worker": ("wrong signature", r""),
    "write_files": ("failed", r"your result is all zeros"),
}


@pytest.mark.parametrize("attack", sorted(EXPECTED))
def test_attacks_get_the_verdict_they_earned(graded, attack):
    status, pattern = EXPECTED[attack]
    row = next(r for r in rows_of(graded, attack) if not r["check"])
    assert re.fullmatch(status, row["status"]) and re.search(pattern, row["message"]), row


def test_hidden_checks_are_counted_even_when_the_sandbox_dies(graded):
    public, hidden = sorted(rows_of(graded, "exits_on_hidden"), key=lambda r: r["check"])
    assert public["status"] == "passed" and hidden["check"] == "secret_checks.py::secret_scale_two"
    assert hidden["status"] == "crashed", hidden


def test_no_secret_and_no_fake_result_in_any_report(graded):
    texts = [
        graded["batch"].stdout,
        graded["batch"].stderr,
        graded["daemons"].stdout,
        json.dumps(graded["rows"]),
        json.dumps(graded["later"]),
    ]
    for text in texts:
        assert SECRET not in text and CLASSMATE_SECRET not in text and "FAKE-RESULT" not in text
        assert "\x1b" not in text and not re.search(r"^\s*(Score: 9/9|✔ classifier)", text, re.M), (
            text
        )


def test_later_submissions_in_the_same_folder_are_graded_normally(graded):
    wrong, correct = graded["later"]["zz_wrong"], graded["later"]["zz_correct"]
    assert [t["status"] for t in attacked_task(wrong)] == ["failed", "failed"], wrong
    assert "swapped" in attacked_task(wrong)[0]["message"]
    assert [t["status"] for t in attacked_task(correct)] == ["passed", "passed"], correct
    assert correct["passed"] == 2, correct  # the public and the hidden check, nothing else
    assert "bubblewrap" in correct["isolation"]
    classmate = rows_of(graded, "classmate")
    assert [r["status"] for r in classmate] == ["passed", "passed"], classmate


def test_no_attack_process_survives(graded):
    assert (
        graded["processes_after"] == [] or graded["processes_after"] == graded["processes_before"]
    ), graded["processes_after"]


def test_no_file_changed_outside_the_submissions(graded):
    before, after = graded["before"], graded["after"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], changed
    planted = {
        n for n in graded["new_names"] if n in ("torch", "zz_redteam.pth") or n.endswith(".pth")
    }
    assert not planted, planted
    # inside the submissions folder only the two later notebooks are new; no attack wrote there
    # either
    added = {Path(k).name for k in graded["sub_after"]} - {
        Path(k).name for k in graded["sub_before"]
    }
    assert added == {"zz_wrong.ipynb", "zz_correct.ipynb"}, added
    assert all(graded["sub_after"][k] == v for k, v in graded["sub_before"].items()), (
        "a submission changed"
    )


def test_json_report_is_not_rewritten_after_the_grader_exits(graded):
    report = json.loads(graded["report_file"].read_text())
    from minisd.course.checks import chapter_module

    # one entry per chapter-09 task (no --extra-checks in this run)
    total = len(chapter_module("09").TASKS)
    assert report["chapter"] == "09" and not report["ok"] and report["total"] == total
    assert graded["report_file"].read_text() == graded["daemons"].stdout


def test_nothing_reached_the_network(graded):
    assert graded["listener"].connections == 0


def test_batch_summary_and_csv(graded):
    out = graded["batch"].stdout
    assert graded["batch"].returncode == 1, out + graded["batch"].stderr
    assert re.search(r"Graded \d+ notebooks in \d+ s", out) and "Isolation: bubblewrap" in out
    students = {r["student"] for r in graded["rows"]}
    assert students == {p.stem for p in ATTACKS if p.stem != "shortcut_fused"} | {"classmate"}


def test_shortcuts_fail_with_a_message(tmp_path):
    """Chapter 01: the fused kernel (bound before the task runs) and minisd's own attention are
    refused."""
    from minisd.course.grade import Grader

    fused = notebook(
        tmp_path / "fused.ipynb", (ROOT / "tests" / "redteam" / "shortcut_fused.py").read_text()
    )
    own = notebook(
        tmp_path / "own.ipynb",
        "import torch\nfrom minisd.attention import attention_math\n# %%\n"
        "def scaled_dot_product_attention(q, k, v, mask=None):\n"
        "    return attention_math(q, k, v, mask)[0]\n",
    )
    with Grader(prewarm=True) as grader:
        for path, name in ((fused, "scaled_dot_product_attention"), (own, "attention_math")):
            report = grader.grade(path, chapter="01", timeout=30)
            task = next(t for t in report.tasks if t["task"] == "scaled_dot_product_attention")
            assert task["status"] == "failed" and name in task["message"], task
            assert "write it yourself" in task["message"]
