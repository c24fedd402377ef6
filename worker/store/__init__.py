"""Where regsweep keeps what outlives a process: Redis (every key in :mod:`~worker.store.keys`)
and, for the CLI without Redis, files. Every Redis command regsweep sends is sent from here
(``tests/test_layout.py`` holds the rest of the code to it, but the broker's wiring).
"""
