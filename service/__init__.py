"""The regsweep HTTP edge: receives, verifies, normalises and enqueues."""
