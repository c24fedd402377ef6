"""The maintenance window: registry controllers, garbage collection, crash recovery, report."""
