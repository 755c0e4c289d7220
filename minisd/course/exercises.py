"""The thinking (ungraded) exercises of a chapter notebook, as the chapter README and the
instructor's guide list them: headings `### Exercise N (thinking): title` or `### Exercise N:
title` (not "(graded)") in the section `## Exercises`, and numbered items `N. *Title.* ...` of an
"Ungraded exercises" list."""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADING = re.compile(r"^###\s+Exercise\s+(\d+)\s*(\((?P<kind>[^)]*)\))?\s*:\s*(?P<title>.+?)\s*$")
LIST_ITEM = re.compile(r"^(\d+)\.\s+(\*(?P<title>[^*]+?)\.?\*)?\s*(?P<rest>.*)$")


@dataclass
class Exercise:
    label: str  # "Exercise 3" or "Ungraded 2"
    title: str  # "positions"
    text: str  # the question, as the notebook states it


def _first_words(text: str, n: int = 8) -> str:
    words = re.sub(r"[`*$]", "", text).split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def _key(title: str) -> str:
    return " ".join(re.sub(r"[$*`.?!:]", "", title).lower().split())


def thinking_exercises(notebook) -> list[Exercise]:
    """The chapter's ungraded (thinking) exercises, in order."""
    found: list[Exercise] = []
    in_section = False
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        if any(line.strip() == "## Exercises" for line in lines):
            in_section = True
        if not in_section:
            continue
        current: Optional[Exercise] = None
        in_list = False
        for line in lines:
            heading = HEADING.match(line)
            item = LIST_ITEM.match(line) if in_list else None
            if heading:
                kind = (heading.group("kind") or "").lower()
                current = None
                if "graded" not in kind or "ungraded" in kind:
                    current = Exercise(f"Exercise {heading.group(1)}", heading.group("title"), "")
                    found.append(current)
            elif "ungraded exercises" in line.lower():
                in_list, current = True, None
            elif item:
                title = (item.group("title") or "").strip() or _first_words(item.group("rest"))
                current = Exercise(f"Ungraded {item.group(1)}", title, item.group("rest"))
                found.append(current)
            elif line.startswith("#"):
                current, in_list = None, False
            elif current is not None:
                current.text = (current.text + "\n" + line.strip()).strip()
    return found
