"""The registry as regsweep reaches it: its API (:mod:`~worker.registry.client`, with the
:mod:`~worker.registry.auth` flow), its media types, and, read-only, its storage.
"""
