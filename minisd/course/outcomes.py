"""What a check can end in, besides passing: the exceptions that checks (checks/__init__.py) and
the sandbox's remote calls (remote.py) raise and the grader turns into a task's status, and the one
function that makes text from the sandbox safe to print."""

from __future__ import annotations


def _clean(text, limit: int = 400) -> str:
    """One printable line: text from the sandbox ends up in reports, CSV files and terminals."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"


class CheckFailed(Exception):
    """The student's function returned a wrong result; the message says how."""


class NotAttempted(Exception):
    """The student's function still raises NotImplementedError."""


class StudentError(Exception):
    """The student's function raised: the exception's type and text and the line of the student's
    code, as the sandbox described them (text only; the exception object never leaves the sandbox).
    """

    def __init__(self, ename: str, evalue: str, where: str):
        where = f" ({where})" if where else ""
        super().__init__(
            f"{_clean(ename, 80)}: {_clean(evalue)}{_clean(where, 200)}"
            if evalue
            else f"{_clean(ename, 80)}{_clean(where, 200)}"
        )


class TaskTimeout(BaseException):
    """The student's code ran past the check's time budget (a BaseException, so no check swallows
    it)."""

    def __init__(self, seconds: float):
        super().__init__(f"{seconds:g} s")
        self.seconds = seconds


class SandboxLost(Exception):
    """The sandbox died, broke the protocol or stopped answering during a check: this check is
    'crashed'."""
