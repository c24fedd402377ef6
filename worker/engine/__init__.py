"""The engine: from a repository's snapshot and its policy to a plan, and the plan carried out.

:mod:`~worker.engine.inventory` takes a frozen snapshot, :mod:`~worker.engine.planner`
turns it into a :class:`~worker.engine.plan.Plan` (a pure function),
:mod:`~worker.engine.executor` is the only code that deletes, and
:mod:`~worker.engine.prune` runs the three for one or many repositories.
"""
