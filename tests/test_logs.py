"""One log record, one JSON line, for serve, worker and beat, crashes included.

Each case runs a real process: what matters is what reaches its stderr after
Celery has redirected the standard streams into loggers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.harness import redisdb
from tests.harness import stack as s
from tests.harness.workers import start_worker


def records(output: str) -> list[dict[str, Any]]:
    """Every line of ``output`` as a JSON object; fails on the first line that is not one."""
    parsed = []
    for line in output.splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not one JSON record: {line!r}\n--- output\n{output}") from exc
    return parsed


def config(tmp_path: Path) -> Path:
    path = tmp_path / "regsweep.yaml"
    document = {
        "registry": {"url": "http://127.0.0.1:9"},
        # A database of its own: the worker below consumes every queue there.
        "redis": {"url": redisdb.url(15)},
        "policies": [],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_beat_that_cannot_write_its_schedule_logs_its_crash_as_whole_records(
    tmp_path: Path,
) -> None:
    """Beat dying on an unwritable schedule (the compose stack's old crash loop) exits non-zero
    with a handful of JSON lines, each traceback whole inside one record's `exception`."""
    done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [s.REGSWEEP, "-c", str(config(tmp_path)), "beat", "-s", "/sys/celerybeat-schedule"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    logged = records(done.stdout + done.stderr)
    assert len(logged) < 10, logged
    crashes = [r for r in logged if r["level"] == "critical"]
    assert crashes and all("PermissionError" in r["exception"] for r in crashes)
    assert all(r["exception"].startswith("Traceback") for r in crashes)
    assert not any(r["logger"] == "celery.redirected" for r in logged), logged


def test_worker_start_and_stop_log_only_json(tmp_path: Path) -> None:
    """A worker's whole output from start to warm shutdown is JSON lines (no banner)."""
    log = tmp_path / "worker.log"
    worker = start_worker(config(tmp_path), log=log, extra=("--without-mingle",), env=os.environ)
    try:
        worker.wait_ready(timeout=60)
    finally:
        worker.stop()
    logged = records(log.read_text())
    assert any(r["message"].endswith("ready.") for r in logged)


HOOKS_PROGRAM = """
import threading
from worker import logs

logs.configure()


class Finalizer:
    def __del__(self):
        raise RuntimeError("raised in a finalizer")


thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
thread.start()
thread.join()
Finalizer()
raise ValueError("nothing caught this")
"""


def test_uncaught_exceptions_are_one_record_each() -> None:
    """In a thread, in a finalizer and in the main thread, an uncaught exception is logged as
    one JSON record with its whole traceback; the process still exits non-zero."""
    done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [sys.executable, "-c", HOOKS_PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    logged = records(done.stderr)
    assert [r["level"] for r in logged] == ["error", "error", "critical"], logged
    thread, finalizer, main = logged
    assert "doomed" in thread["message"] and "ZeroDivisionError" in thread["exception"]
    assert "RuntimeError: raised in a finalizer" in finalizer["exception"]
    assert main["exception"].startswith("Traceback") and "nothing caught this" in main["exception"]
