"""The commands a user copies from README.md and docs/: found in the Markdown itself.

A command is a line of a fenced code block marked ``sh``, ``bash``, ``shell`` or
``console`` (in ``console`` blocks only the lines after a ``$ `` prompt; the
rest is output). A line ending in ``\\`` continues on the next one. Commands
that docs add later are found the same way, so a test that runs every one of
them covers them too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SHELL_BLOCKS: Final = frozenset({"sh", "bash", "shell", "console"})
PROMPT: Final = "$ "
_FENCE: Final = re.compile(r"^\s*```\s*([\w-]*)")


@dataclass(frozen=True)
class DocCommand:
    """One command as the docs show it, and where."""

    path: str  # relative to the repository root
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def documents(root: Path = REPO_ROOT) -> list[Path]:
    """README.md and every page under docs/, in reading order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def commands(root: Path = REPO_ROOT) -> list[DocCommand]:
    """Every command of every document, in document order."""
    found: list[DocCommand] = []
    for path in documents(root):
        relative = str(path.relative_to(root))
        found += [DocCommand(relative, n, t) for n, t in commands_in(path.read_text())]
    return found


def commands_in(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, command) for each command in ``markdown``'s shell blocks."""
    language: str | None = None
    pending: list[str] = []
    start = 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = _FENCE.match(line)
        if fence:
            language = None if language is not None else fence.group(1)
            pending = []
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = line
        if not pending:
            opened = _command_start(line, console=language == "console")
            if opened is None:
                continue
            text, start = opened, number
        pending.append(text.rstrip())
        if not pending[-1].endswith("\\"):
            yield start, "\n".join(pending)
            pending = []


def _command_start(line: str, *, console: bool) -> str | None:
    """The command a line begins, or ``None`` (output, blank, a comment line)."""
    if console:
        return line[len(PROMPT) :] if line.startswith(PROMPT) else None
    stripped = line.strip()
    return None if not stripped or stripped.startswith("#") else line
