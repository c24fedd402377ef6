"""Messages a worker took, so that another gives them back promptly if that worker dies.

kombu's Redis transport keeps every delivered, unacknowledged message in its
``unacked`` hash and puts it back on its queue only once the visibility
timeout has passed (the maintenance window's length plus an hour): a prune
whose worker was SIGKILLed would wait hours, its job "running". So every
worker process that consumes (Celery's main process):

- records a lease for each message it receives (``task_received``; ETA
  messages included, which wait in the worker's memory): delivery tag →
  this worker, the task, its job id;
- keeps a liveness key ``<prefix>worker:<id>`` alive (:data:`ALIVE_TTL`,
  renewed every :data:`BEAT_EVERY` by a thread);
- every :data:`REAP_EVERY` (and once when it starts) gives back, through
  kombu's own restore, the messages of workers that are provably dead (same
  machine and namespace: the pid is gone; elsewhere: the liveness key has
  expired) and its own that it dropped without acknowledging them (Celery
  forgets what it held when the broker connection is lost, and kombu cannot
  put it back while Redis is away), marks their jobs, and forgets the leases
  of acknowledged messages.

So a prune whose worker died runs again within about ``ALIVE_TTL + REAP_EVERY``
(at once when the worker is restarted on the same machine). A pool process
that dies is not the worker: Celery puts its task back itself
(``task_reject_on_worker_lost``), and the next prune breaks the dead process's
prune lock (:mod:`worker.store.locks`). The leases and liveness keys themselves are kept
by :class:`worker.store.leases.LeaseRecords`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from celery import Celery
from celery.signals import task_received, worker_init, worker_ready, worker_shutdown
from celery.worker import state as worker_state

from worker.errors import ConfigError, StateError
from worker.identity import ProcessIdentity
from worker.queue.names import TASK_PRUNE
from worker.queue.runtime import configured
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.leases import LeaseRecords
from worker.store.redis import RedisClient, sync_client
from worker.store.state import JobState, SyncState

log = logging.getLogger("regsweep.worker")

ALIVE_TTL: Final = timedelta(seconds=20)
BEAT_EVERY: Final = timedelta(seconds=5)
REAP_EVERY: Final = timedelta(seconds=5)
REAP_ROUNDS: Final = int(REAP_EVERY / BEAT_EVERY)
_UNFINISHED: Final = frozenset({JobState.QUEUED.value, JobState.RUNNING.value})


@dataclass(frozen=True)
class Lease:
    worker: str
    owner: ProcessIdentity
    task: str
    task_id: str
    job_id: str | None

    def dumps(self) -> str:
        return json.dumps({**asdict(self), "owner": asdict(self.owner)})

    @classmethod
    def loads(cls, raw: bytes | str) -> Lease | None:
        try:
            data = json.loads(raw)
            return cls(
                worker=str(data["worker"]),
                owner=ProcessIdentity.from_json(data["owner"]),
                task=str(data["task"]),
                task_id=str(data["task_id"]),
                job_id=data.get("job_id") if isinstance(data.get("job_id"), str) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass(frozen=True)
class GivenBack:
    """A message put back on its queue: its worker died, or dropped it (``dropped``)."""

    tag: str
    lease: Lease
    dropped: bool = False


class Leases:
    """This worker's leases, its liveness, and the reaping of dead workers' messages."""

    def __init__(self, app: Celery, client: RedisClient, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.app = app
        self.client = client
        self.keys = Keys(prefix)
        self.records = LeaseRecords(client, self.keys)
        self.state = SyncState(client, prefix=prefix)
        self.worker_id = uuid.uuid4().hex
        self.identity = ProcessIdentity.of()
        self._rounds = 0
        #: This worker's unacknowledged messages it did not hold at the last reap.
        self._suspects: set[str] = set()

    def take(self, tag: str, task: str, task_id: str, job_id: str | None) -> None:
        """Record that this worker holds the message ``tag`` (never raises: best effort)."""
        lease = Lease(self.worker_id, self.identity, task, task_id, job_id)
        try:
            self.records.record(tag, lease.dumps())
        except StateError as exc:
            log.warning("lease of %s %s not recorded: %s", task, task_id, exc)

    def beat(self) -> None:
        self.records.beat(self.worker_id, json.dumps(asdict(self.identity)), ALIVE_TTL)

    def reap(self) -> list[GivenBack]:
        """Give back the messages of dead workers, and this worker's own that it no longer
        holds; forget leases of acknowledged ones."""
        raw = self.records.leases()
        if not raw:
            return []
        leases = {tag: Lease.loads(value) for tag, value in raw.items()}
        with self.app.connection_for_write() as connection:
            # kombu's Redis channel (its QoS is what restores unacknowledged messages).
            channel: Any = connection.default_channel
            held = self.records.unacknowledged(channel.unacked_key, list(leases))
            gone = [tag for tag, lease in leases.items() if lease is None or tag not in held]
            self.records.forget(gone)  # acknowledged (or unreadable)
            live = {tag: lease for tag, lease in leases.items() if lease and tag in held}
            given = self._give_back(channel, live)
        for back in given:
            self._note(back)
        return given

    def _give_back(self, channel: Any, leases: dict[str, Lease]) -> list[GivenBack]:
        given: list[GivenBack] = []
        suspects: set[str] = set()
        for tag, lease in leases.items():
            mine = lease.worker == self.worker_id
            if not (self._lost(lease, tag, suspects) if mine else self._dead(lease)):
                continue
            # kombu's own restore: atomic, and a message restored twice is restored
            # once; to the consuming end, so it runs next.
            channel.qos.restore_by_tag(tag, leftmost=False)
            self.records.forget([tag])
            given.append(GivenBack(tag, lease, dropped=mine))
        self._suspects = suspects
        return given

    def _lost(self, lease: Lease, tag: str, suspects: set[str]) -> bool:
        """Whether this worker dropped a message it received without acknowledging it.

        On a lost broker connection Celery forgets the messages it held (countdown
        retries waiting for their time, most often) and kombu's attempt to put them
        back fails while Redis is away: they would wait for the visibility timeout.
        A message unknown to this worker at two reaps in a row is taken for lost (one
        just finished is acknowledged before the next reap)."""
        if lease.task_id in worker_state.requests:
            return False
        suspects.add(tag)
        return tag in self._suspects

    def _dead(self, lease: Lease) -> bool:
        if lease.owner.is_local():
            return not lease.owner.is_alive()
        return not self.records.alive(lease.worker)

    def _note(self, back: GivenBack) -> None:
        lease = back.lease
        where = f"{lease.owner.host} pid {lease.owner.pid}"
        what = "lost its broker connection" if back.dropped else "died"
        log.warning(
            "worker %s %s holding %s %s (job %s); put back on its queue",
            where,
            what,
            lease.task,
            lease.task_id,
            lease.job_id or "-",
        )
        if lease.job_id is None:
            return
        when = datetime.now(UTC).isoformat(timespec="seconds")
        note = f"{when}: its worker ({where}) {what}; the task was put back on its queue"
        try:
            job = self.state.get_job(lease.job_id)
            if job is None or job.get("state") not in _UNFINISHED:
                return
            fields: dict[str, Any] = {"interruptions": [*job.get("interruptions", []), note]}
            if lease.task == TASK_PRUNE:
                # Queued again; a GC keeps "running", which its redelivery recovers from.
                fields["state"] = JobState.QUEUED.value
            self.state.update_job(lease.job_id, **fields)
        except StateError as exc:
            log.warning("job %s not marked: %s", lease.job_id, exc)

    def round(self) -> None:
        """One beat, and a reap every :data:`REAP_EVERY`; on Celery's timer, never raises."""
        try:
            self.beat()
            if self._rounds % REAP_ROUNDS == 0:
                self.reap()
        except Exception:  # the timer must keep calling: Redis may be back next time
            log.warning("lease round failed; trying again", exc_info=True)
        self._rounds += 1

    def stop(self) -> None:
        with contextlib.suppress(StateError):  # it expires by itself
            self.records.withdraw(self.worker_id)


def job_id_of(kwargs: Any) -> str | None:
    value = kwargs.get("job_id") if isinstance(kwargs, dict) else None
    return value if isinstance(value, str) else None


# --- wiring: Celery's main process (the consumer) keeps the leases -----------------------

_leases: Leases | None = None


@worker_init.connect
def _open(sender: Any = None, **_: Any) -> None:
    global _leases  # noqa: PLW0603 - one per worker process, made at its start
    try:
        url = configured().redis_url
    except ConfigError:
        return
    if url is not None and sender is not None:
        _leases = Leases(sender.app, sync_client(url))


@worker_ready.connect
def _start_rounds(sender: Any = None, **_: Any) -> None:
    """Reap at once (a restarted worker gives back what its predecessor held), then on
    the consumer's own timer: no thread of ours in a process that forks pool children."""
    if _leases is None or sender is None:
        return
    _leases.round()
    sender.timer.call_repeatedly(BEAT_EVERY.total_seconds(), _leases.round)


@task_received.connect
def _take(request: Any = None, **_: Any) -> None:
    if _leases is not None and request is not None:
        tag = request.message.delivery_tag
        _leases.take(str(tag), request.name, request.id, job_id_of(request.kwargs))


@worker_shutdown.connect
def _close(**_: Any) -> None:
    if _leases is not None:
        _leases.stop()
