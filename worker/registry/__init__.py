"""The registry client and its auth flow; see :mod:`worker.registry.client`."""

from worker.registry.auth import RegistryAuth
from worker.registry.client import (
    DEFAULT_BACKOFF,
    DEFAULT_PAGE_SIZE,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ManifestRef,
    RegistryClient,
    ResponseHook,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "ManifestRef",
    "RegistryAuth",
    "RegistryClient",
    "ResponseHook",
]
