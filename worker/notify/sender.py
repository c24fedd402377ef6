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

Each attempt is bounded as a whole, not per read: connecting, sending, the
status line, headers and what is read of the body all happen within
``timeout`` (an asyncio deadline around the request, on the thread's own
event loop), so a receiver that answers one byte a second cannot keep an
attempt, or its target's queue, for longer than that. Of an answer, at most
:data:`ANSWER_LIMIT` bytes are read (only a failure's are, for its log line;
a 2xx is not read at all), undecoded; headers are bounded by h11's 16 KiB.
A process that closes cancels the attempt under way, which then ends
``failed`` like any other.

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

import asyncio
import contextlib
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
from worker.durations import exact
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
#: Bytes of an answer read at most (of a failure's, for its log line; a 2xx is not read).
ANSWER_LIMIT: Final = 4096
#: Characters of an answer put in a log line or an outcome's detail.
SHOWN_LIMIT: Final = 200
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


async def post(
    client: httpx.AsyncClient, target: NotifyTarget, note: Notification, timeout: float
) -> Attempt:
    """One delivery attempt of ``note`` to ``target``, all of it within ``timeout``
    seconds; never raises (but a cancelled attempt is cancelled)."""
    url = target.url.reveal()
    content = json.dumps(payload.body(target.kind, note), default=str).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Regsweep-Event": note.event,
        "X-Regsweep-Delivery": note.id,
        # The answer is read raw (a few KiB at most): no compressed body to expand.
        "Accept-Encoding": "identity",
    }
    try:
        async with asyncio.timeout(timeout):
            request = client.stream("POST", url, content=content, headers=headers, timeout=timeout)
            async with request as response:
                if 200 <= response.status_code < 300:
                    return Attempt(True)
                return _failure(response, await _excerpt(response), url)
    except (TimeoutError, httpx.TimeoutException):
        return Attempt(False, retry=True, detail=f"no complete answer within {timeout:.3g}s")
    except httpx.TransportError as exc:
        return Attempt(False, retry=True, detail=scrub(f"{type(exc).__name__}: {exc}", url))
    except httpx.HTTPError as exc:
        return Attempt(False, detail=scrub(f"{type(exc).__name__}: {exc}", url))


async def _excerpt(response: httpx.Response) -> str:
    """The first :data:`ANSWER_LIMIT` bytes of an answer's body; the rest is never read
    (leaving the block closes the connection)."""
    got = bytearray()
    async for chunk in response.aiter_raw():
        got += chunk[: ANSWER_LIMIT - len(got)]
        if len(got) >= ANSWER_LIMIT:
            break
    return got.decode("utf-8", errors="replace")


def _failure(response: httpx.Response, body: str, url: str) -> Attempt:
    status = response.status_code
    detail = scrub(f"HTTP {status}: {body[:SHOWN_LIMIT]}".rstrip(": "), url)
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
    """One target's queue and the thread that delivers it, on an event loop of its own."""

    def __init__(
        self,
        target: NotifyTarget,
        on_outcome: OutcomeCallback,
        *,
        queue_limit: int = QUEUE_LIMIT,
        retry_base: float = RETRY_BASE_SECONDS,
    ) -> None:
        self.target = target
        self._on_outcome = on_outcome
        self._queue: queue.Queue[tuple[Notification, float] | None] = queue.Queue()
        self._limit = queue_limit
        self._retry_base = retry_base
        self.stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        #: The attempt under way (cancelled when the process closes the sender).
        self._current: asyncio.Task[Attempt] | None = None
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
        """Stop: the attempt under way is cancelled (it ends failed), what is still queued
        is dropped (and counted) now."""
        self.stop.set()
        with contextlib.suppress(RuntimeError):  # the loop is closed: no attempt is under way
            self._loop.call_soon_threadsafe(self._cancel)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._end(item[0], DROPPED, "the process closed before it was sent")
        self._queue.put(None)

    def _cancel(self) -> None:
        if self._current is not None:
            self._current.cancel()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        client = httpx.AsyncClient(follow_redirects=False)
        try:
            while (item := self._queue.get()) is not None:
                note, made = item
                if self.stop.is_set():
                    self._end(note, DROPPED, "the process closed before it was sent")
                else:
                    self.deliver(client, note, made)
        finally:
            self._loop.run_until_complete(client.aclose())
            self._loop.close()

    def _attempt(self, client: httpx.AsyncClient, note: Notification, timeout: float) -> Attempt:
        """One attempt on this thread's loop; a cancelled one is a failure."""
        self._current = self._loop.create_task(post(client, self.target, note, timeout))
        try:
            return self._loop.run_until_complete(self._current)
        except asyncio.CancelledError:
            return Attempt(False, detail="the process closed during the attempt")
        finally:
            self._current = None

    def deliver(self, client: httpx.AsyncClient, note: Notification, made: float) -> None:
        target = self.target
        deadline = made + target.give_up_after.total_seconds()
        attempts, detail = 0, "given up before the first attempt"
        while (remaining := deadline - time.monotonic()) > 0 and not self.stop.is_set():
            attempts += 1
            result = self._attempt(client, note, min(target.timeout.total_seconds(), remaining))
            if result.ok:
                self._end(note, SENT, f"attempt {attempts}")
                return
            detail = result.detail
            if not result.retry or attempts > target.retries:
                break
            wait = backoff(attempts, base=self._retry_base, cap=RETRY_CAP_SECONDS, jitter=0.2)
            wait = max(wait, min(result.retry_after or 0.0, RETRY_CAP_SECONDS))
            if time.monotonic() + wait >= deadline:
                detail += f"; no time left to retry within {exact(target.give_up_after)}"
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
