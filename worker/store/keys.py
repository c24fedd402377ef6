"""Every Redis key regsweep uses, and only here: the keyspace of one installation.

All keys start with one prefix (``regsweep:`` by default), so several installations,
or tests, can share a Redis without touching each other. Per area:

=====================  ==================================================================
deliveries, jobs       ``dedup:<source>:<id>``, ``job:<id>``, ``jobs:recent``,
                       ``jobs:newest:<kind>``, ``deadletter``, ``deadletter:replayed:<id>``,
                       ``ci:<delivery>``
prunes                 ``lock:prune:<repo>``, ``pending:prune:<repo>``,
                       ``scheduled:prune:<repo>``, ``deferred``, ``reconciled``,
                       ``sweep:<job>``, ``sweep:<job>:done``
maintenance window     ``maintenance`` (the flag), ``lock:gc``, ``gc:session``,
                       ``gc:window:<start>``
tag index (history)    ``idx:<repo>:tags|pushed|versions|untagged|seen|listed|stored``,
                       ``idx:repos``, ``hold:<repo>``, ``holds``,
                       ``evidence:clock``, ``evidence:doubts``
audit                  ``audit`` (the stream), ``audit:digests:<repo>``, ``audit:job:<job>``,
                       ``audit:job:<job>:outcomes``, ``audit:job:<job>:restored``,
                       ``audit:deleted:<repo>``
metrics                ``metrics:deletions``, ``metrics:jobs``, ``metrics:registry_latency``,
                       ``metrics:gc``, ``metrics:dead_letters``, ``metrics:notifications``
health, notifications  ``health:last_prune``, ``notify:dead_letters``, ``notify:<event>:<job>``
worker leases          ``leases``, ``worker:<id>``
processes, intake      ``processes``, ``process:<role>@<host>:<pid>``, ``jobs:queued``,
                       ``jobs:queued:<client>``, ``installation``
dashboard              ``view:<repo>`` (the last plan), ``views`` (summaries), ``views:version``,
                       ``gc:history``,
                       ``ui:signin:<client>``, ``ui:ran:<preview job>``
=====================  ==================================================================

The Celery broker's own keys (the queues ``events``, ``prune``, ``gc`` and kombu's
``unacked*``) are kombu's, on the broker's database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX: Final = "regsweep:"


@dataclass(frozen=True)
class Keys:
    """The keys of one installation (one prefix)."""

    prefix: str = DEFAULT_PREFIX

    # --- deliveries, jobs -------------------------------------------------------------

    def delivery(self, source: str, delivery_id: str) -> str:
        return f"{self.prefix}dedup:{source}:{delivery_id}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def recent_jobs(self) -> str:
        """Job ids by creation time (a sorted set, capped): what ``regsweep jobs`` lists."""
        return f"{self.prefix}jobs:recent"

    def newest_job(self, kind: str) -> str:
        """The id of the newest job of ``kind`` (``regsweep status``: last sweep, last GC)."""
        return f"{self.prefix}jobs:newest:{kind}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}deadletter"

    def replayed(self, letter_id: str) -> str:
        """The job a replay of dead letter ``letter_id`` made (``regsweep replay``)."""
        return f"{self.prefix}deadletter:replayed:{letter_id}"

    def ci_event(self, delivery_id: str) -> str:
        """A CI event as the workers received it (JSON), for ``regsweep replay``."""
        return f"{self.prefix}ci:{delivery_id}"

    @property
    def events_queue(self) -> str:
        """A plain list of event messages (the test sink's; production publishes to Celery)."""
        return f"{self.prefix}queue:events"

    @property
    def jobs_queue(self) -> str:
        return f"{self.prefix}queue:jobs"

    # --- prunes -----------------------------------------------------------------------

    def prune_lock(self, repository: str) -> str:
        return f"{self.prefix}lock:prune:{repository}"

    @property
    def prune_locks(self) -> str:
        """A SCAN pattern over every repository's prune lock."""
        return f"{self.prefix}lock:prune:*"

    def pending(self, repository: str) -> str:
        return f"{self.prefix}pending:prune:{repository}"

    def scheduled(self, repository: str) -> str:
        return f"{self.prefix}scheduled:prune:{repository}"

    @property
    def deferred(self) -> str:
        return f"{self.prefix}deferred"

    @property
    def reconciled(self) -> str:
        """Repositories whose index was read from the live registry at least once."""
        return f"{self.prefix}reconciled"

    def sweep(self, job_id: str) -> str:
        return f"{self.prefix}sweep:{job_id}"

    def sweep_done(self, job_id: str) -> str:
        return f"{self.prefix}sweep:{job_id}:done"

    # --- the maintenance window -------------------------------------------------------

    @property
    def maintenance_flag(self) -> str:
        """Set (to the GC job's id) while a window runs: prunes defer themselves."""
        return f"{self.prefix}maintenance"

    @property
    def gc_lock(self) -> str:
        return f"{self.prefix}lock:gc"

    @property
    def gc_session(self) -> str:
        return f"{self.prefix}gc:session"

    def gc_window(self, start: str) -> str:
        return f"{self.prefix}gc:window:{start}"

    # --- the tag index ----------------------------------------------------------------

    def index(self, repository: str, part: str) -> str:
        """``tags``, ``pushed``, ``versions`` (the registry time and id of the newest event
        applied to each tag: later events win, whatever order they come in), ``untagged``,
        ``seen`` (sightings), ``listed`` (the last listing's start), ``stored`` (indexes
        pushed by digest only)."""
        return f"{self.prefix}idx:{repository}:{part}"

    @property
    def indexed_repositories(self) -> str:
        return f"{self.prefix}idx:repos"

    @property
    def evidence_clock(self) -> str:
        """The registry's clock skew as the last plan measured it (JSON)."""
        return f"{self.prefix}evidence:clock"

    @property
    def evidence_doubts(self) -> str:
        """Repository -> what its last plan doubted of the registry's times (JSON); only
        repositories with a refusal or a doubted tag have an entry."""
        return f"{self.prefix}evidence:doubts"

    def hold(self, repository: str) -> str:
        return f"{self.prefix}hold:{repository}"

    @property
    def held_repositories(self) -> str:
        return f"{self.prefix}holds"

    # --- the audit --------------------------------------------------------------------

    @property
    def audit(self) -> str:
        return f"{self.prefix}audit"

    def audit_digests(self, repository: str) -> str:
        return f"{self.audit}:digests:{repository}"

    def audit_job(self, job_id: str) -> str:
        return f"{self.audit}:job:{job_id}"

    def audit_outcomes(self, job_id: str) -> str:
        return f"{self.audit}:job:{job_id}:outcomes"

    def audit_restorations(self, job_id: str) -> str:
        """Which of the job's records a restore put back since (record id -> restoration)."""
        return f"{self.audit}:job:{job_id}:restored"

    def audit_deleted(self, repository: str) -> str:
        return f"{self.audit}:deleted:{repository}"

    # --- metrics ----------------------------------------------------------------------

    @property
    def metrics_deletions(self) -> str:
        return f"{self.prefix}metrics:deletions"

    @property
    def metrics_jobs(self) -> str:
        return f"{self.prefix}metrics:jobs"

    @property
    def metrics_registry_latency(self) -> str:
        return f"{self.prefix}metrics:registry_latency"

    @property
    def metrics_gc(self) -> str:
        """GC totals and alerts (:class:`worker.store.metrics.GcMetrics`)."""
        return f"{self.prefix}metrics:gc"

    # --- worker leases ----------------------------------------------------------------

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    # --- processes (their reports: the policy each runs) -------------------------------

    @property
    def processes(self) -> str:
        """The ids of the processes that reported (a set; each report expires)."""
        return f"{self.prefix}processes"

    def process(self, process_id: str) -> str:
        return f"{self.prefix}process:{process_id}"

    # --- intake: jobs the API accepted that no worker started yet ----------------------

    @property
    def queued_jobs(self) -> str:
        """Job ids the API accepted, by the time they were accepted (a sorted set)."""
        return f"{self.prefix}jobs:queued"

    def queued_jobs_of(self, client: str) -> str:
        """The same, of one API client (a token's fingerprint, never the token)."""
        return f"{self.prefix}jobs:queued:{client}"

    # --- the installation ------------------------------------------------------------

    @property
    def installation(self) -> str:
        """Set once and never expiring: its absence means Redis lost its data (a restart
        without persistence, a flush), and the holds are rebuilt from the audit file."""
        return f"{self.prefix}installation"

    # --- health and notifications -----------------------------------------------------

    @property
    def last_prune(self) -> str:
        """The last prune job that succeeded (JSON: time, job, repository), for /healthz."""
        return f"{self.prefix}health:last_prune"

    @property
    def dead_letters_total(self) -> str:
        """Dead letters ever kept (the list itself is capped): the metric and the alert."""
        return f"{self.prefix}metrics:dead_letters"

    @property
    def notified_dead_letters(self) -> str:
        """``dead_letters_total`` as of the last dead-letter notification."""
        return f"{self.prefix}notify:dead_letters"

    @property
    def metrics_notifications(self) -> str:
        """Notifications by ``["<target>", "<event>", "<outcome>"]``."""
        return f"{self.prefix}metrics:notifications"

    def notified(self, event: str, subject: str) -> str:
        """Set once ``event`` about ``subject`` (a job) was told: an alert goes out once."""
        return f"{self.prefix}notify:{event}:{subject}"

    # --- the dashboard and the read API -----------------------------------------------

    def plan_view(self, repository: str) -> str:
        """The last plan a worker made of ``repository``, as the dashboard shows it (JSON)."""
        return f"{self.prefix}view:{repository}"

    @property
    def plan_views(self) -> str:
        """Repository -> the summary of its last plan (a hash): the repositories page."""
        return f"{self.prefix}views"

    @property
    def plan_views_version(self) -> str:
        """Counts every change of ``views``: a reader keeps what it parsed until this moves."""
        return f"{self.prefix}views:version"

    @property
    def gc_history(self) -> str:
        """The newest GC reports, newest first (a capped list): the maintenance page."""
        return f"{self.prefix}gc:history"

    def preview_run(self, preview_id: str) -> str:
        """The job that ran the dashboard's preview ``preview_id`` (a preview runs once)."""
        return f"{self.prefix}ui:ran:{preview_id}"

    def signin_failures(self, client: str) -> str:
        """Wrong tokens from one client address (the dashboard's sign-in, the read API, the
        job API), counted for a while."""
        return f"{self.prefix}ui:signin:{client}"
