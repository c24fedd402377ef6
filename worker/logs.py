"""JSON-lines logging for the long-running processes (serve, worker, beat).

One small formatter instead of a dependency: a log line is one JSON object
with time, level, logger and message (plus the exception, when there is one).
Secrets never reach a record: :class:`~worker.policy.Secret` renders as stars
and the Redis URL stays out of the Config's repr.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

DEFAULT_LEVEL: Final = "INFO"
#: Attributes of a LogRecord that say where a line comes from, kept when set.
_EXTRA: Final = ("task_id", "task_name", "job_id", "repository")


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
