"""The settings of one installation as frozen value objects: registry, hooks, maintenance.

Everything here is built once, by :mod:`worker.settings.load` when the process
starts, and every default is a named constant. Nothing here reads the
environment or the file system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final, Literal

from worker.engine.policy import Policy

DEFAULT_CONCURRENCY: Final = 8
DEFAULT_AUDIT_PATH: Final = "regsweep-audit.jsonl"
DEFAULT_SWEEP_EVERY: Final = timedelta(hours=6)
DEFAULT_WINDOW_DURATION: Final = timedelta(hours=2)
#: A GC does not start when less than this much of the window is left.
DEFAULT_WINDOW_MARGIN: Final = timedelta(minutes=10)
DEFAULT_BODY_LIMIT: Final = 1024 * 1024
DEFAULT_HEAD_LIMIT: Final = 64 * 1024
DEFAULT_HEAD_TIMEOUT: Final = timedelta(seconds=10)
DEFAULT_BODY_TIMEOUT: Final = timedelta(seconds=30)
DEFAULT_MAX_CONNECTIONS: Final = 512
#: Jobs the API has accepted that no worker has started yet, in all and per API token.
DEFAULT_MAX_QUEUED_JOBS: Final = 1000
DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN: Final = 100
#: How long ``restore`` holds what it put back (every plan keeps a held tag).
DEFAULT_RESTORE_HOLD: Final = timedelta(days=7)


class Secret:
    """A secret value that never shows itself in a repr, a log line or a response."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class RegistrySettings:
    url: str
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    #: The filesystem driver's rootdirectory, read-only: exact push times, stored manifests.
    storage_path: str | None = None


@dataclass(frozen=True)
class HookSettings:
    """Resolved hook secrets; a hook whose secret is ``None`` is disabled (404)."""

    registry_token: Secret | None = None
    github_secret: Secret | None = None
    gitlab_token: Secret | None = None
    gitlab_signing_key: Secret | None = None
    api_token: Secret | None = None
    #: Reads only: the read API (``GET /api/v1/...``) and the dashboard's viewer role.
    #: The API token is the dashboard's admin role; neither set: both off (404).
    viewer_token: Secret | None = None
    body_limit: int = DEFAULT_BODY_LIMIT
    #: Request line and headers, in bytes (431 beyond).
    head_limit: int = DEFAULT_HEAD_LIMIT
    #: To receive the head (from the connection or the head's first byte), then the body (408).
    head_timeout: timedelta = DEFAULT_HEAD_TIMEOUT
    body_timeout: timedelta = DEFAULT_BODY_TIMEOUT
    #: Open connections; one more is answered 503 and closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Jobs ``POST /api/v1/jobs`` accepted and no worker started yet; one more gets 429.
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS
    max_queued_jobs_per_token: int = DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN
    #: ``/metrics`` wants ``Authorization: Bearer`` with it when set.
    metrics_token: Secret | None = None
    #: ``host:port`` to serve ``/metrics`` on instead of the hooks' address.
    metrics_listen: str | None = None
    #: ``hooks.*_env`` keys the file sets whose variable is not set (their hook is off).
    unset: tuple[str, ...] = ()
    #: (key, variable name as messages may show it) for every ``hooks.*_env`` key set.
    variables: tuple[tuple[str, str], ...] = ()

    def variable(self, key: str) -> str:
        """The variable ``key`` (``hooks.github_secret_env``) names, as a message may show it."""
        return dict(self.variables).get(key, f"the variable {key} names")


@dataclass(frozen=True)
class DockerControllerSettings:
    kind: Literal["docker"] = "docker"
    container: str = "registry"
    #: The registry config GC reads; ``None``: the one the container serves (its command).
    config_path: str | None = None


@dataclass(frozen=True)
class ProcessControllerSettings:
    readonly_command: str
    readwrite_command: str
    gc_command: str
    storage_path: str | None = None
    kind: Literal["process"] = "process"
    #: The registry's config, read by the storage-level prune's guards; ``None``: the
    #: ``.yml`` / ``.yaml`` file ``gc_command`` names.
    config_path: str | None = None


ControllerSettings = DockerControllerSettings | ProcessControllerSettings


class GcGrace(StrEnum):
    """When GC collects what a storage-level prune deleted (``maintenance.gc_grace``)."""

    #: The next window's GC: the window runs GC first, then the storage prune, so its
    #: deletions stay restorable until the next window.
    NEXT_WINDOW = "next-window"
    #: This window's GC: the storage prune first, then GC.
    NONE = "0"


@dataclass(frozen=True)
class MaintenanceSettings:
    window_cron: str | None = None
    window_duration: timedelta = DEFAULT_WINDOW_DURATION
    window_margin: timedelta = DEFAULT_WINDOW_MARGIN
    controller: ControllerSettings | None = None
    #: Registry major.minor for the GC report when the controller cannot tell, e.g. "3.1".
    registry_version: str | None = None
    #: Every window prunes the enforced policies on the storage, read-only
    #: (``maintenance.storage_prune``; ``regsweep gc --storage-prune`` for one window).
    storage_prune: bool = False
    gc_grace: GcGrace = GcGrace.NEXT_WINDOW
    #: A storage prune also takes ``_manifests``, ``_layers`` and ``_uploads`` out of
    #: repositories with no tag and no manifest left (never the directory).
    remove_empty_repositories: bool = False


# -- notifications (notify:) --------------------------------------------------------------

#: Every event a notification target can subscribe to (``notify[].events``).
NOTIFY_EVENTS: Final = (
    "prune.deleted",
    "prune.failed",
    "sweep.finished",
    "gc.finished",
    "gc.failed",
    "registry.left_read_only",
    "gc.recovered",
    "dead_letter",
)
DEFAULT_NOTIFY_TIMEOUT: Final = timedelta(seconds=5)
DEFAULT_NOTIFY_RETRIES: Final = 3
#: A notification not delivered this long after it was made is given up (and counted).
DEFAULT_NOTIFY_GIVE_UP: Final = timedelta(minutes=2)


@dataclass(frozen=True)
class NotifyTarget:
    """One receiver of notifications: a generic JSON webhook or a Slack incoming webhook."""

    name: str
    kind: Literal["webhook", "slack"]
    #: The URL is a secret (a Slack webhook URL is its own credential): from ``url_env``.
    url: Secret
    events: frozenset[str] = frozenset(NOTIFY_EVENTS)
    timeout: timedelta = DEFAULT_NOTIFY_TIMEOUT
    retries: int = DEFAULT_NOTIFY_RETRIES
    give_up_after: timedelta = DEFAULT_NOTIFY_GIVE_UP

    def wants(self, event: str) -> bool:
        return event in self.events


@dataclass(frozen=True)
class NotifySettings:
    targets: tuple[NotifyTarget, ...] = ()
    #: ``notify[i] (name).url_env: VARIABLE`` of targets whose variable is not set (they are off).
    unset: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole validated policy file plus what the environment added."""

    registry: RegistrySettings
    policies: tuple[Policy, ...] = ()
    #: ``None``: no Redis configured; the CLI then keeps its audit log in ``audit_path``.
    #: Out of the repr: ``redis://:password@host`` is a common way to write it.
    redis_url: str | None = field(default=None, repr=False)
    sweep_every: timedelta = DEFAULT_SWEEP_EVERY
    hooks: HookSettings = field(default_factory=HookSettings)
    maintenance: MaintenanceSettings = field(default_factory=MaintenanceSettings)
    #: The audit log (and, beside it, the CLI's state file) when no Redis is configured:
    #: an absolute path, by default next to the policy file.
    audit_path: str | None = None
    #: With Redis, ``audit.path`` when the file gives it: every audit record (and hold) is
    #: appended there too, so that restore and holds outlive a Redis that lost its data.
    audit_mirror: str | None = None
    restore_hold: timedelta = DEFAULT_RESTORE_HOLD
    source: str = "<memory>"
    #: Where job summaries, GC reports and alerts are sent (``notify:``).
    notify: NotifySettings = field(default_factory=NotifySettings)
    #: ``sha256:<hex>`` of the policy file's bytes as loaded (what ``status`` shows).
    digest: str | None = None

    @property
    def audit_file(self) -> str:
        """The JSONL audit file of a configuration without Redis."""
        return self.audit_path or DEFAULT_AUDIT_PATH

    def policy_for(self, repository: str) -> Policy | None:
        """The first policy matching ``repository``; unmatched repositories are never touched."""
        return next((p for p in self.policies if p.matches_repository(repository)), None)
