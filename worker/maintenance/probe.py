"""Ask the registry itself whether a mode switch took effect.

A controller returns once its switch command is done; the registry may still
be starting. Reads answer when ``GET /v2/`` says 200 or 401 (it is up; the
credentials are not the question). Whether writes work is asked by starting a
blob upload in :data:`PROBE_REPOSITORY` — 202 means writable (the upload is
cancelled at once), 405 with an ``Allow`` header means read-only — using the
configured credentials, so the account needs push rights on that repository.
Without them (401/403) the state of writes cannot be told and reads answering
has to do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final, Self

import httpx

from worker.errors import ControllerError
from worker.registry.auth import RegistryAuth
from worker.registry.client import ssl_context
from worker.settings.model import RegistrySettings

#: The write probe's repository; an upload is started and cancelled, nothing is stored.
PROBE_REPOSITORY: Final = "regsweep/write-probe"
#: How long a switched registry may take to answer as expected.
SWITCH_TIMEOUT: Final = 60.0
POLL_INTERVAL: Final = 0.1
REQUEST_TIMEOUT: Final = 5.0


class WriteState(StrEnum):
    WRITABLE = "writable"
    READ_ONLY = "read-only"
    #: 401/403 on the upload: this account may not push, so nobody can tell.
    UNKNOWN = "unknown"
    #: No answer, 5xx, or something else unexpected.
    DOWN = "down"


class RegistryProbe:
    """Blocking reads/writes checks against one registry (Celery tasks are synchronous)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        repository: str = PROBE_REPOSITORY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._http = http
        self._repository = repository
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls, settings: RegistrySettings, *, repository: str = PROBE_REPOSITORY
    ) -> Self:
        password = settings.password.reveal() if settings.password else None
        http = httpx.Client(
            base_url=settings.url,
            auth=RegistryAuth(settings.username, password),
            verify=ssl_context(settings.ca_file),
            timeout=REQUEST_TIMEOUT,
            headers={"User-Agent": "regsweep"},
        )
        return cls(http, repository=repository)

    def close(self) -> None:
        self._http.close()

    def answers_reads(self) -> bool:
        try:
            return self._http.get("/v2/").status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def write_state(self) -> WriteState:
        try:
            response = self._http.post(f"/v2/{self._repository}/blobs/uploads/")
            if response.status_code == 202:
                self._cancel(response)
                return WriteState.WRITABLE
        except httpx.HTTPError:
            return WriteState.DOWN
        if response.status_code == 405 and "Allow" in response.headers:
            return WriteState.READ_ONLY
        if response.status_code in (401, 403):
            return WriteState.UNKNOWN
        return WriteState.DOWN

    def _cancel(self, started: httpx.Response) -> None:
        location = started.headers.get("Location")
        if location:
            # A leftover upload only costs a directory the registry's upload purge removes.
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(location)

    def wait_readonly(self, timeout: float = SWITCH_TIMEOUT) -> WriteState:
        """Until reads answer and a write is refused (or cannot be tried); the write state."""
        return self._wait({WriteState.READ_ONLY, WriteState.UNKNOWN}, "refuse writes", timeout)

    def wait_writable(self, timeout: float = SWITCH_TIMEOUT) -> WriteState:
        """Until reads answer and a write is accepted (or cannot be tried); the write state."""
        return self._wait({WriteState.WRITABLE, WriteState.UNKNOWN}, "accept writes", timeout)

    def _wait(self, wanted: set[WriteState], what: str, timeout: float) -> WriteState:
        deadline = time.monotonic() + timeout
        last = WriteState.DOWN
        while True:
            if self.answers_reads():
                last = self.write_state()
                if last in wanted:
                    return last
            if time.monotonic() >= deadline:
                raise ControllerError(
                    f"the registry did not {what} within {timeout:g}s (writes: {last})"
                )
            self._sleep(POLL_INTERVAL)
