"""Where the command's output goes: stdout that a closed pipe cannot break, and progress
bars on a terminal.

``regsweep plan --json | head`` closes the pipe early. Writing on then raises
``BrokenPipeError``; :func:`quiet_on_closed_pipe` makes stdout swallow it, once and for
all (the rest goes to ``/dev/null``), so the command finishes what it started (a prune
is never cut short by ``| head``), exits with its own code and prints no traceback.

:func:`progress` draws rich progress bars on stderr when stderr is a terminal, with the
log lines (one per deletion) scrolling above them; anywhere else it draws nothing, and
the log lines are the plain record of what happened. rich is imported only then: the
commands start as fast without it.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, Protocol


class _ClosedPipeSafe:
    """A text stream that turns into ``/dev/null`` when its reader goes away."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Point the file descriptor at /dev/null: what is still buffered, and the
        interpreter's last flush at exit, go nowhere instead of raising again."""
        self.closed_by_reader = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with suppress(BrokenPipeError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def reader_gone() -> bool:
    """Whether nobody reads stdout any more: a write found it closed, or (a pipe) its
    reader has gone. What a command that only watches (``jobs --follow``) stops on."""
    if isinstance(sys.stdout, _ClosedPipeSafe) and sys.stdout.closed_by_reader:
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor: an in-process caller's stream
        return False


def quiet_on_closed_pipe() -> None:
    """From now on a closed stdout ends the output quietly (see the module's docstring)."""
    if not isinstance(sys.stdout, _ClosedPipeSafe):
        sys.stdout = _ClosedPipeSafe(sys.stdout)


class Tracker(Protocol):
    """What the commands tell a progress display."""

    def add(self, label: str, total: int) -> int: ...

    def grow(self, task: int, more: int) -> None: ...

    def advance(self, task: int) -> None: ...


class _Silent:
    """No terminal: nothing drawn; the log lines say what happens."""

    def add(self, label: str, total: int) -> int:
        return 0

    def grow(self, task: int, more: int) -> None:
        pass

    def advance(self, task: int) -> None:
        pass


class _Bars:
    """rich bars on stderr, one per task, gone when the command ends."""

    def __init__(self, bars: Any) -> None:
        self._bars = bars

    def add(self, label: str, total: int) -> int:
        return int(self._bars.add_task(label, total=total))

    def grow(self, task: int, more: int) -> None:
        total = self._bars.tasks[task].total or 0
        self._bars.update(task, total=total + more)

    def advance(self, task: int) -> None:
        self._bars.advance(task)


@contextmanager
def progress() -> Iterator[Tracker]:
    """Progress bars while the block runs, if stderr is a terminal."""
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
        # Tables on stdout scroll above the bars only when stdout is that terminal too;
        # redirected, they must stay in their file.
        redirect_stdout=sys.stdout.isatty(),
    )
    with bars, _logs_above(bars):
        yield _Bars(bars)


@contextmanager
def _logs_above(bars: Any) -> Iterator[None]:
    """Log handlers hold the stderr they were made with; while the bars are drawn they
    write to rich's stand-in for it, which prints each line above the bars."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__
    ]
    for handler in handlers:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler in handlers:
            handler.setStream(sys.__stderr__)
