"""regsweep: keep a self-hosted CNCF distribution registry small and tidy."""

__version__ = "0.1.0"
