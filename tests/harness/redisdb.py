"""Which Redis server the tests use: ``$REGSWEEP_TEST_REDIS`` (default the machine's 6379).

Each test module keeps its own database number on that server (and a key prefix
of its own where it shares one); pointing ``REGSWEEP_TEST_REDIS`` at a private
``redis-server`` lets two checkouts run the suite side by side.
"""

from __future__ import annotations

import os
from typing import Final

SERVER: Final = os.environ.get("REGSWEEP_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")


def url(db: int) -> str:
    """The URL of database ``db`` on the test server."""
    return f"{SERVER}/{db}"
