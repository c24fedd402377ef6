"""The maintenance window: registry controllers, garbage collection and its report."""

from worker.maintenance.controllers import (
    DockerController,
    ProcessController,
    RegistryController,
    make_controller,
)
from worker.maintenance.gc import GcOutputParser, GcResult, parse_gc_output

__all__ = [
    "DockerController",
    "GcOutputParser",
    "GcResult",
    "ProcessController",
    "RegistryController",
    "make_controller",
    "parse_gc_output",
]
