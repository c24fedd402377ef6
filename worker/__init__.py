"""regsweep's back end: the engine, the registry, the stores, the settings and the workers.

- :mod:`worker.engine`: what to delete and how, safely (pure planning, the one executor);
- :mod:`worker.registry`: the registry's API and, read-only, its storage;
- :mod:`worker.store`: Redis and files: history, audit, job records, locks, metrics;
- :mod:`worker.settings`: the policy file, validated once into frozen objects;
- :mod:`worker.queue`: Celery: the app, its tasks and what keeps them at-least-once;
- :mod:`worker.maintenance`: the maintenance window and garbage collection.
"""
