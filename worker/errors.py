"""Every error regsweep raises, under one base.

    RegsweepError
    ├── ConfigError                  the policy file or settings are wrong (exit 2)
    │   └── UnknownRepository        a repository asked for by name that cannot be planned
    ├── RegistryError                the registry refused, failed or could not be reached
    │   ├── RegistryUnavailable      connection errors, timeouts, 5xx after retries (transient)
    │   │   └── DeleteUnsettled      a DELETE's answer was lost and no look could settle it
    │   ├── RegistryAuthError        401/403 after the auth dance
    │   ├── RegistryReadOnly         405 plain text + Allow: maintenance mode; defer, never fail
    │   ├── DeletesDisabled          405 UNSUPPORTED: storage.delete.enabled is false
    │   ├── ManifestUnknown          404 for a manifest or tag
    │   └── RegistryProtocolError    an answer that breaks the distribution spec
    ├── StateError                   Redis (state, dedup, locks, audit) unreachable or refused
    ├── StorageError                 registry.storage_path unreadable, or not this registry's
    │   └── StoragePruneRefused      a storage-level prune's guard said no: nothing removed
    ├── UnknownJob                   no job record by that id (or prefix), or several
    ├── NothingToReplay              no dead letter or recorded CI event by that id, or one
    │                                with nothing in it to run again
    ├── SafetyViolation              a re-check before DELETE found a kept image in the way
    ├── PlanChanged                  a confirmed deletion's plan is no longer the one previewed
    ├── RestoreError                 a restore cannot be done as asked
    │   ├── NothingToRestore         the audit has no (unique) deletion of that digest
    │   └── RestoreConflict          a tag to put back now points at another digest
    ├── PruneWaits                   a prune that must run later, not fail
    │   ├── Deferred                 a maintenance window runs: after its end
    │   └── RepositoryBusy           another prune holds the repository: retried shortly
    ├── BadEvent                     a webhook payload or job request that cannot be used (4xx)
    ├── QueueFull                    too many jobs accepted and not started yet (429)
    ├── Unverified                   a delivery failed authentication (401)
    └── ControllerError              switching the registry or running GC failed
        └── GcLockLost               the GC lock expired under a running GC: the GC is stopped

Third-party exceptions (httpx, redis, docker) are wrapped where their client is
called, so callers only ever catch these.
"""

from __future__ import annotations


class RegsweepError(Exception):
    """Base of every regsweep error."""


class ConfigError(RegsweepError):
    """The policy file or the environment is wrong; ``problems`` lists every issue."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UnknownRepository(ConfigError):
    """Repositories asked for by name (``regsweep plan NAME``) that are not a repository
    name, that no policy governs, or that the registry does not have; one problem each."""


class RegistryError(RegsweepError):
    """The registry refused, failed or could not be reached; ``hint`` says what to change
    when that is knowable (it ends the message too)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        hint: str | None = None,
        codes: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.hint = hint
        #: The registry's ``errors[].code`` values (``MANIFEST_BLOB_UNKNOWN``...), if any.
        self.codes = codes
        #: The message without its hint.
        self.detail = message
        super().__init__(f"{message}: {hint}" if hint else message)


class RegistryUnavailable(RegistryError):
    """Connection error, timeout or 5xx that survived the retries: worth retrying later."""


class DeleteUnsettled(RegistryUnavailable):
    """A DELETE may have been carried out (its answer was lost) and the registry could not be
    asked afterwards whether it was: the outcome is unknown, not "not done"."""


class RegistryAuthError(RegistryError):
    """Credentials were refused (401/403 after the challenge was answered)."""


class RegistryReadOnly(RegistryError):
    """The registry is in read-only maintenance mode: writes must wait for the window's end."""


class DeletesDisabled(RegistryError):
    """``storage.delete.enabled`` is false: a configuration error on the registry."""


class ManifestUnknown(RegistryError):
    """The manifest or tag does not exist (404)."""


class RegistryProtocolError(RegistryError):
    """The registry answered something the distribution spec does not allow."""


class StateError(RegsweepError):
    """Redis, which holds state, dedup keys, locks and the audit stream, failed."""


class TurnLost(StateError):
    """A prune's per-repository lock is no longer its own (it expired while Redis could
    not renew it, or Redis lost it): another prune of the repository may run now, so this
    one deletes nothing more. The work is retried, as a registry that went away is."""


class StorageError(RegsweepError):
    """``registry.storage_path`` cannot serve a repository's plan: a file in it regsweep
    cannot read, or a repository the registry has and the storage lacks. That repository is
    left alone (a plan never runs on part of its evidence); the others go on."""


class StoragePruneRefused(StorageError):
    """A guard of the storage-level prune refused it (a Redis blob-descriptor cache, writes
    not refused, the storage and the API disagreeing): nothing was removed from storage."""


class UnknownJob(RegsweepError):
    """No job record has that id (unknown, or expired), or a prefix names several."""


class NothingToReplay(RegsweepError):
    """``regsweep replay ID``: no dead letter or recorded CI event has that id (a prefix names
    several dead letters), or the dead letter holds nothing to run again."""


class SafetyViolation(RegsweepError):
    """A re-check right before a DELETE found that a kept image needs the digest."""


class PlanChanged(RegsweepError):
    """A deletion confirmed in the dashboard now plans something other than its preview
    showed (a push or another prune came between): nothing is deleted; preview again."""


class RestoreError(RegsweepError):
    """A restore cannot be done as asked; nothing was written."""


class NothingToRestore(RestoreError):
    """The audit has no deletion of that digest in that repository (or the prefix is ambiguous)."""


class RestoreConflict(RestoreError):
    """A tag to restore now points at another digest (``--force`` moves it back)."""


class PruneWaits(RegsweepError):
    """A prune that must run later instead of now; never a failure."""


class Deferred(PruneWaits):
    """The registry is (about to be) read-only: the prune waits for the window's end."""


class RepositoryBusy(PruneWaits):
    """Another prune holds the repository; the task retries shortly."""


class BadEvent(RegsweepError):
    """A webhook payload that cannot be used; the message says which field is wrong."""


class QueueFull(RegsweepError):
    """Too many jobs the API accepted are waiting for a worker: ask again in ``retry_after``."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Unverified(RegsweepError):
    """A delivery failed authentication; the message is safe to send back."""


class ControllerError(RegsweepError):
    """Switching the registry read-only / read-write or running GC failed."""


class GcLockLost(ControllerError):
    """The GC lock expired under a running GC (another process may think it crashed): the
    GC is stopped before a recovery switches the registry read-write under it."""
