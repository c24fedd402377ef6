"""The HTTP edge: receives, verifies, normalises and enqueues. No registry calls, no engine."""
