"""Which Redis server the tests use.

``$REGSWEEP_TEST_REDIS`` when set; else, in a pytest-xdist worker, a private
``redis-server`` of that worker's own (started on first use, stopped when the
worker exits); else the machine's 6379.

Each user below keeps its own database number on that server, so that modules run side
by side on one server (``REGSWEEP_TEST_REDIS`` with ``-n``) never flush each other's data;
the harnesses several modules share give each test a key prefix of its own and delete only
that prefix's keys. A new module takes a free number (or a shared harness), and says so here:

==  ==========================================================================
 1  tests/test_tagindex_forget.py
 2  tests/test_storage_prune.py: the registry's own blob-descriptor cache
 3  tests/test_service_ingest.py: a broker that is not the state store's Redis
 4  tests/test_evidence_registry.py
 5  tests/test_check_config.py
 6  tests/test_tagindex.py
 7  tests/test_cli_jobs.py
 8  tests/test_dashboard_jobs.py
 9  tests/test_service_ingest.py
10  tests/harness/maintenance.py (the maintenance tests; a prefix per test)
11  tests/harness/stack.py (the worker, stack and e2e tests; bench/ingest_bench.py)
12  tests/test_audit.py
13  tests/harness/service.py (the service tests; a prefix per test)
14  tests/test_docs.py
15  tests/test_logs.py
==  ==========================================================================

Modules that run side by side in xdist workers without ``REGSWEEP_TEST_REDIS`` never share
a server at all; pointing ``REGSWEEP_TEST_REDIS`` at a private ``redis-server`` lets two
checkouts run the suite side by side.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import time
from typing import Final

import redis

MACHINE_SERVER: Final = "redis://127.0.0.1:6379"
#: Nothing on disk: the tests' data lives as long as the worker.
_OPTIONS: Final = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


@functools.cache
def server() -> str:
    """The base URL (no database) of the Redis server this process's tests use."""
    explicit = os.environ.get("REGSWEEP_TEST_REDIS")
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return _start_private()
    return MACHINE_SERVER


def url(db: int) -> str:
    """The URL of database ``db`` on the test server."""
    return f"{server()}/{db}"


def _start_private() -> str:
    """A ``redis-server`` for this worker alone, on a free port, stopped at exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), *_OPTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(_stop, proc)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no redis-server answered on port {port}") from None
            time.sleep(0.02)
        finally:
            client.close()
    return f"redis://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
