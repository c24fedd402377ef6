"""Benchmarks: regsweep against the registry API floor, side by side in one run."""
