"""A crashed window's maintenance command, killed: its session named, provably, then SIGKILLed.

A process controller runs the GC and the switch commands in sessions of their own
(:mod:`worker.maintenance.controllers`), whose leader the running job records
(:func:`worker.store.window.record_session`); a recovery kills what a dead worker
left running. The GC lock itself is :mod:`worker.store.gclock`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Final

from worker.identity import ProcessIdentity, group_alive, start_time

#: How long a killed session's processes may take to be gone.
SESSION_EXIT_WAIT: Final = 10.0


def kill_session(identity: ProcessIdentity) -> bool:
    """SIGKILL the process group ``identity`` leads, if it is provably that process and alive.

    A process controller's GC and switch commands run in sessions of their own
    and outlive a worker killed with SIGKILL: a GC left running after the switch
    back to read-write would delete blobs pushed meanwhile, a read-only switch
    would race the recovery's own restart. Returns once the group is gone.
    """
    if not identity.is_local() or start_time(identity.pid) != identity.started:
        return False
    try:
        os.killpg(identity.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    # Gone before anything else runs: a registry the killed command had started still
    # holds its port for a moment, and a restart now would fail to bind.
    deadline = time.monotonic() + SESSION_EXIT_WAIT
    while group_alive(identity.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True
