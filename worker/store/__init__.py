"""Where regsweep keeps what outlives a process: Redis (every key in :mod:`~worker.store.keys`)
and, for the CLI without Redis, files.
"""
