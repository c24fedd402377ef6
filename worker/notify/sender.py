"""Deliver notifications: a thread per target, retries with backoff, a bounded total time.

A job publishes its notification after its state is recorded, and
:meth:`Notifier.publish` only puts it on the target's queue: it never blocks,
never raises and never changes what the job did. Each target has a thread of
its own, so a slow or dead receiver delays only its own notifications. A
delivery is retried on a connection error, a timeout, 408/425/429 and 5xx
(``retries`` times, :func:`worker.backoff.backoff` between attempts, at least a
429's ``Retry-After``), and given up once ``give_up_after`` has passed since
the notification was made; any other answer (a 404 for a deleted Slack hook,
400 for a payload it refuses) fails it at once. Every notification ends
``sent``, ``failed`` or ``dropped`` (a full queue, or pending when the process
closed the sender), logged and counted through ``on_outcome``.

Why threads in the process that made the notification, rather than Celery
tasks: a notification must go out when the broker is the thing in trouble
(the alert of a window that left the registry read-only, a recovery), from
the CLI's own GC as from a worker's, and without taking a worker slot of the
``events`` queue for a minute of retries against a receiver that is down.
What this gives up is durability: notifications still queued when a process
dies are lost (a closed process drains them for a bounded time first).

The URL is a secret. It is never logged nor put in an error: an exception's
text and a receiver's answer are scrubbed of it before they are logged.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import httpx

from worker.backoff import backoff
from worker.notify import payload
from worker.notify.message import Notification
from worker.settings.model import NotifyTarget

log = logging.getLogger("regsweep.notify")


def _version() -> str:
    try:
        return importlib.metadata.version("regsweep")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SENT: Final = "sent"
FAILED: Final = "failed"
DROPPED: Final = "dropped"
#: Notifications waiting per target; one more is dropped (and counted).
QUEUE_LIMIT: Final = 1000
RETRY_BASE_SECONDS: Final = 1.0
RETRY_CAP_SECONDS: Final = 30.0
#: Answers worth another attempt besides 5xx.
RETRYABLE: Final = frozenset({408, 425, 429})
#: How long a closing process waits for its pending notifications.
DEFAULT_DRAIN_SECONDS: Final = 10.0
USER_AGENT: Final = f"regsweep/{_version()}"

#: Told (target name, event, outcome) for every notification that ends.
OutcomeCallback = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Attempt:
    """How one POST ended."""

    ok: bool
    retry: bool = False
    detail: str = ""
    #: Seconds a 429 or 503 asked to wait (``Retry-After``).
    retry_after: float | None = None


def post(client: httpx.Client, target: NotifyTarget, note: Notification, timeout: float) -> Attempt:
    """One delivery attempt of ``note`` to ``target``; never raises."""
    url = target.url.reveal()
    content = json.dumps(payload.body(target.kind, note), default=str).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Regsweep-Event": note.event,
        "X-Regsweep-Delivery": note.id,
    }
    try:
        response = client.post(url, content=content, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return Attempt(False, retry=True, detail=f"no answer within {timeout:.3g}s")
    except httpx.TransportError as exc:
        return Attempt(False, retry=True, detail=scrub(f"{type(exc).__name__}: {exc}", url))
    except httpx.HTTPError as exc:
        return Attempt(False, detail=scrub(f"{type(exc).__name__}: {exc}", url))
    status = response.status_code
    if 200 <= status < 300:
        return Attempt(True)
    detail = scrub(f"HTTP {status}: {response.text[:200]}".rstrip(": "), url)
    if status in RETRYABLE or status >= 500:
        return Attempt(False, retry=True, detail=detail, retry_after=_retry_after(response))
    return Attempt(False, detail=detail)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def scrub(text: str, url: str) -> str:
    """``text`` without the secret URL, nor its path (a Slack hook's secret is its path)."""
    parts = httpx.URL(url)
    for secret in (url, url.rstrip("/"), str(parts.raw_path.decode(errors="replace"))):
        if len(secret) > 1:
            text = text.replace(secret, "<url>")
    return text


class TargetSender:
    """One target's queue and the thread that delivers it."""

    def __init__(
        self,
        target: NotifyTarget,
        on_outcome: OutcomeCallback,
        *,
        client: httpx.Client | None = None,
        queue_limit: int = QUEUE_LIMIT,
        retry_base: float = RETRY_BASE_SECONDS,
    ) -> None:
        self.target = target
        self._on_outcome = on_outcome
        self._client = client or httpx.Client(follow_redirects=False)
        self._queue: queue.Queue[tuple[Notification, float] | None] = queue.Queue()
        self._limit = queue_limit
        self._retry_base = retry_base
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"regsweep-notify-{target.name}", daemon=True
        )
        self.thread.start()

    def put(self, note: Notification) -> None:
        if self._queue.qsize() >= self._limit or self.stop.is_set():
            self._end(note, DROPPED, "its queue is full" if not self.stop.is_set() else "closed")
            return
        self._queue.put((note, time.monotonic()))

    def close(self) -> None:
        """No more notifications: the thread ends once the queue is delivered."""
        self._queue.put(None)

    def abandon(self) -> None:
        """Stop retrying; what is still queued is dropped (and counted) now."""
        self.stop.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._end(item[0], DROPPED, "the process closed before it was sent")
        self._queue.put(None)  # the thread, still in an attempt, ends after it

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                note, made = item
                if self.stop.is_set():
                    self._end(note, DROPPED, "the process closed before it was sent")
                else:
                    self.deliver(note, made)
        finally:
            self._client.close()

    def deliver(self, note: Notification, made: float) -> None:
        target = self.target
        deadline = made + target.give_up_after.total_seconds()
        attempts, detail = 0, "given up before the first attempt"
        while (remaining := deadline - time.monotonic()) > 0:
            attempts += 1
            result = post(
                self._client, target, note, min(target.timeout.total_seconds(), remaining)
            )
            if result.ok:
                self._end(note, SENT, f"attempt {attempts}")
                return
            detail = result.detail
            if not result.retry or attempts > target.retries:
                break
            wait = backoff(attempts, base=self._retry_base, cap=RETRY_CAP_SECONDS, jitter=0.2)
            wait = max(wait, min(result.retry_after or 0.0, RETRY_CAP_SECONDS))
            if time.monotonic() + wait >= deadline:
                detail += f"; no time left to retry within {target.give_up_after}"
                break
            log.info(
                "notification %s %s to %s: attempt %d failed (%s); again in %.1fs",
                note.event,
                note.id,
                target.name,
                attempts,
                detail,
                wait,
            )
            if self.stop.wait(wait):
                detail += "; the process closed"
                break
        self._end(note, FAILED, f"after {attempts} attempts: {detail}")

    def _end(self, note: Notification, outcome: str, detail: str) -> None:
        name = self.target.name
        if outcome == SENT:
            log.info("notification %s %s sent to %s (%s)", note.event, note.id, name, detail)
        else:
            log.warning(
                "notification %s %s to %s %s: %s", note.event, note.id, name, outcome, detail
            )
        try:
            self._on_outcome(name, note.event, outcome)
        except Exception:  # counting is best effort; the sender must go on
            log.warning("notification outcome not counted", exc_info=True)


class Notifier:
    """Sends each notification to the targets that want its event."""

    def __init__(
        self,
        targets: Sequence[NotifyTarget],
        on_outcome: OutcomeCallback | None = None,
        *,
        retry_base: float = RETRY_BASE_SECONDS,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        count = on_outcome or (lambda *_: None)
        self._senders = [
            TargetSender(t, count, retry_base=retry_base, queue_limit=queue_limit) for t in targets
        ]
        self._closed = False

    def publish(self, note: Notification | None) -> None:
        """Queue ``note`` for every target that wants it; never blocks, never raises."""
        if note is None or self._closed:
            return
        for sender in self._senders:
            if sender.target.wants(note.event):
                sender.put(note)

    def close(self, wait: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Deliver what is queued for at most ``wait`` seconds, then drop the rest."""
        self._closed = True
        deadline = time.monotonic() + wait
        for sender in self._senders:
            sender.close()
        for sender in self._senders:
            sender.thread.join(max(0.0, deadline - time.monotonic()))
        for sender in self._senders:
            sender.abandon()
        for sender in self._senders:
            sender.thread.join(1.0)
