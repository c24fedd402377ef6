"""uvicorn's httptools protocol with the bounds it lacks: head size, head and body time, conns.

uvicorn on httptools (the stack ``regsweep serve`` runs for throughput,
docs/performance.md) hands every received byte to the parser and keeps what
the parser calls back with: the URL is grown with ``bytes +=`` and httptools
grows each header value the same way, so a 128 MiB request head costs as much
memory and quadratic time, and stalls every other request on the loop.
Nothing bounds the time a client may take to send its head (a connection that
sends nothing is kept forever) or its body. h11, uvicorn's other parser,
bounds the head's size only, at twice the CPU per request.

:class:`BoundedHttpToolsProtocol` counts the head's bytes *before* they reach
the parser, feeding it at most :attr:`RequestLimits.head_limit` of them, and
answers:

- ``431`` once the head is longer (never parsed past the limit);
- ``408`` when the head is not complete within ``head_timeout`` of the
  connection (or of its first byte, for the next request on a kept-alive
  connection); a connection that sent nothing is closed without one;
- ``408`` when the body is not complete within ``body_timeout`` of the head;
  the app's ``receive`` then reports a disconnect;
- ``503`` to a connection beyond ``max_connections``, closed at once.

Each answer is JSON (``{"error": ...}``) and closes the connection. A request
whose head and body arrive in one read, the usual case, arms no timer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from worker.settings.model import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEAD_LIMIT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    HookSettings,
)

log = logging.getLogger("regsweep.service")

#: After a refusal, input is read and dropped this long, or this much, before the close.
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1024 * 1024
REFUSAL_LOG_EVERY: Final = 10.0


class RefusalLog:
    """Logs refused connections at most once per :data:`REFUSAL_LOG_EVERY`: under a flood
    of connections a line each would cost more than the refusals."""

    def __init__(self) -> None:
        self._count = 0
        self._logged = -math.inf

    def note(self, open_connections: int) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged >= REFUSAL_LOG_EVERY:
            log.warning(
                "%d connections refused (503) since the last such line: %d open, the limit",
                self._count,
                open_connections,
            )
            self._count, self._logged = 0, now


_REFUSALS: Final = RefusalLog()


@dataclass(frozen=True)
class RequestLimits:
    """What one connection may cost the service before it is answered and closed."""

    head_limit: int = DEFAULT_HEAD_LIMIT
    head_timeout: float = DEFAULT_HEAD_TIMEOUT.total_seconds()
    body_timeout: float = DEFAULT_BODY_TIMEOUT.total_seconds()
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @classmethod
    def of(cls, hooks: HookSettings) -> RequestLimits:
        return cls(
            head_limit=hooks.head_limit,
            head_timeout=hooks.head_timeout.total_seconds(),
            body_timeout=hooks.body_timeout.total_seconds(),
            max_connections=hooks.max_connections,
        )


def bounded_protocol(limits: RequestLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class to give uvicorn (``http=``) for ``limits``."""
    return type("BoundedHttpTools", (BoundedHttpToolsProtocol,), {"limits": limits})


def refusal(status: int, reason: str) -> bytes:
    """A complete response that closes the connection, in the service's error shape."""
    body = json.dumps({"error": reason}).encode()
    head = (
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return STATUS_LINE[status] + head + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """See the module's docstring; :func:`bounded_protocol` sets :attr:`limits`."""

    limits: ClassVar[RequestLimits] = RequestLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True
        #: The parser has seen the first byte of the head being read.
        self._head_begun = False
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        #: Answered and closing: input is read and dropped until the close.
        self._refused = False
        self._dropped = 0
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            _REFUSALS.note(len(self.connections) - 1)
            self._refuse(503, "too many connections, retry later")
            return
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._drop_input(data)
            return
        if not self._reading_head or self._head_bytes + len(data) <= self.limits.head_limit:
            # The usual read: a whole request, or a body. Nothing to cut.
            if self._reading_head:
                self._head_bytes += len(data)
            super().data_received(data)
            self._arm_timers()
            return
        while data:
            if not self._reading_head:
                super().data_received(data)
                break
            room = self.limits.head_limit - self._head_bytes
            if room <= 0:
                self._refuse(431, f"request head is larger than {self.limits.head_limit} bytes")
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self._refused or self.transport.is_closing():
                return
        self._arm_timers()

    def _arm_timers(self) -> None:
        """Time what is still incomplete after this read: a head begun, a body expected."""
        if self._refused or self.transport.is_closing():
            return
        if self._reading_head:
            # A head begun, or bytes between requests (stray CRLFs cancel uvicorn's
            # keep-alive timer); not the quiet after a request whose answer is coming.
            idle = self.cycle is None or self.cycle.response_complete
            if (self._head_begun or idle) and self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.head_timeout, self._head_too_slow
                )
        elif self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_begun = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits behind a response still being made: not its fault.
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_too_slow)
            return
        if not self._head_begun:
            self.transport.close()  # idle since it connected: nothing to answer
            return
        self._refuse(408, f"request head not received within {self.limits.head_timeout:g}s")

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self._refuse(408, f"request body not received within {self.limits.body_timeout:g}s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` unless a response has begun, and close; the app, if one runs
        for this request, sees a disconnect and its answer goes nowhere.

        The close lingers (up to :data:`LINGER_SECONDS` and :data:`LINGER_BYTES` of
        input read and dropped): closing with unread input would send a reset, which
        can destroy the answer before the client reads it.
        """
        self._cancel_timers()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(refusal(status, reason))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._refused = True
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _drop_input(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)
