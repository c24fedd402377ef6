"""JSON-lines logging for the long-running processes (serve, worker, beat).

One small formatter instead of a dependency: a log line is one JSON object
with time, level, logger and message (plus the exception, when there is one).
Secrets never reach a record: :class:`~worker.settings.model.Secret` renders as stars
and the Redis URL stays out of the Config's repr.

An exception nothing caught is one record too. Celery replaces ``sys.stderr``
in worker and beat with a proxy that logs every ``write()`` as a record of its
own, and the interpreter prints an uncaught exception's traceback in dozens of
small writes (the indentation, the source line, each ``^`` of the caret line):
a beat that could not open its schedule logged its crash as ~100 one-fragment
records, thousands a minute under a restart loop. So the interpreter's hooks
for uncaught exceptions (main thread, other threads, "unraisable" ones in
finalizers) log the exception as one record instead of printing it, and
warnings (Celery's "running as root" among them) are logged, not printed.

A Celery worker also prints a few status lines straight to the real stdout
from its signal handlers ("worker: Warm shutdown (MainProcess)"), where taking
the logging module's locks could deadlock; :func:`configure_worker` makes
those lines JSON too, written with one ``os.write`` and no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Final

DEFAULT_LEVEL: Final = "INFO"
#: Attributes of a LogRecord that say where a line comes from, kept when set.
_EXTRA: Final = (
    "task_id",
    "task_name",
    "job_id",
    "repository",
    # a deletion's line (worker.engine.executor) and a prune job's summary (worker.engine.prune)
    "digest",
    "tags",
    "action",
    "policy",
    "rule",
    "reason",
    "status",
    "outcome",
    "counts",
    "seconds",
)
_STDERR_FD: Final = 2


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRA:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = DEFAULT_LEVEL) -> None:
    """Send every logger's records to stderr as JSON lines (replaces other root handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO, URLs included: too chatty for a worker.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


def configure_worker(level: str = DEFAULT_LEVEL) -> None:
    """:func:`configure`, and a Celery worker's signal-handler status lines as JSON lines."""
    configure(level)
    from celery.apps import worker as celery_worker  # noqa: PLC0415 - only workers need it

    celery_worker.safe_say = _say  # type: ignore[attr-defined]


def _say(message: str, stream: object = None) -> None:
    """Celery's ``safe_say`` (same arguments): called in signal handlers, so no logging."""
    line = {
        "time": datetime.now(UTC).isoformat(),
        "level": "warning",
        "logger": "celery.apps.worker",
        "message": message.strip(),
    }
    # stderr gone: nothing else to tell.
    with contextlib.suppress(OSError):
        os.write(_STDERR_FD, (json.dumps(line) + "\n").encode())


_uncaught = logging.getLogger("regsweep.uncaught")


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, traceback)
        return
    _uncaught.critical("uncaught exception, exiting: %r", exc, exc_info=(kind, exc, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "unknown"
    _uncaught.error(
        "uncaught exception in thread %s: %r",
        name,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    exc = unraisable.exc_value
    info = (unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None
    _uncaught.error(
        "%s: %r", unraisable.err_msg or "exception ignored", unraisable.object, exc_info=info
    )
