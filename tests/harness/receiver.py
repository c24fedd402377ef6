"""A webhook receiver for notification tests: a real Starlette app that records every POST.

The first segment of the path says how it answers, so one receiver plays every
kind of target at once:

``ok``, ``slack``, anything else
    200 (Slack's incoming webhooks answer ``ok``).
``flaky``
    500 for the first :attr:`Receiver.flaky_failures` attempts of each delivery id, then 200.
``fail``
    500 every time, the body echoing the request's path (a secret URL a careless
    server repeats must still never reach a log).
``reject``
    404 with the path echoed (a deleted Slack hook): not worth a retry.
``slow``
    200 after :attr:`Receiver.delay` seconds, longer than the sender's timeout.

Two receivers below HTTP count what really went out on the socket:
:class:`TrickleServer` answers every connection one byte of a status line at a
time, forever, so that no read ever times out; :class:`FloodServer` answers a
500 with a 200 MiB body as fast as the sender takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

#: What :class:`FloodServer` answers: the size that took a worker to 1.3 GB.
HUGE_BYTES = 200 * 1024 * 1024
HUGE_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Delivery:
    behaviour: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def event(self) -> str:
        return self.headers.get("x-regsweep-event", "")

    @property
    def delivery_id(self) -> str:
        return self.headers.get("x-regsweep-delivery", "")


@dataclass
class Receiver:
    flaky_failures: int = 2
    delay: float = 3.0
    deliveries: list[Delivery] = field(default_factory=list)
    _attempts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{behaviour}/{rest:path}", self._receive, methods=["POST"])]
        )

    async def _receive(self, request: Request) -> Response:
        behaviour = request.path_params["behaviour"]
        body = json.loads(await request.body())
        delivery = Delivery(
            behaviour, request.url.path, dict(request.headers), body, time.monotonic()
        )
        with self._lock:
            self.deliveries.append(delivery)
            self._attempts[f"{behaviour}:{delivery.delivery_id}"] += 1
            attempt = self._attempts[f"{behaviour}:{delivery.delivery_id}"]
        if behaviour == "flaky" and attempt <= self.flaky_failures:
            return PlainTextResponse("try again", status_code=500)
        if behaviour == "fail":
            return PlainTextResponse(f"internal error at {request.url.path}", status_code=500)
        if behaviour == "reject":
            return PlainTextResponse(f"no_service {request.url.path}", status_code=404)
        if behaviour == "slow":
            await asyncio.sleep(self.delay)
        return PlainTextResponse("ok")

    def of(self, behaviour: str, event: str | None = None) -> list[Delivery]:
        with self._lock:
            return [
                d
                for d in self.deliveries
                if d.behaviour == behaviour and (event is None or d.event == event)
            ]


class RawServer:
    """A TCP server on a thread of its own that answers each connection with :meth:`answer`,
    counting the connections, the ones that ended and the bytes that went out."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._sock.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._connection, sock=self._sock)

    async def _shutdown(self) -> None:
        """Stop listening and end every connection still being answered."""
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        try:
            await self.answer(writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the sender hung up, or the server stops
        finally:
            with self._lock:
                self.closed += 1
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Send ``data`` and wait until the socket took it; counted once it has."""
        writer.write(data)
        await writer.drain()
        with self._lock:
            self.sent += len(data)

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class TrickleServer(RawServer):
    """``HTTP/1.1 500 ...`` one byte every :attr:`every` seconds, the head never finished:
    a per-read timeout never fires."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__()
        self.every = every

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 500 Internal Server Error\r\nX-Padding: " + b"x" * 10**6
        for byte in head:
            await self.write(writer, bytes([byte]))
            await asyncio.sleep(self.every)


class FloodServer(RawServer):
    """A 500 whose body is :data:`HUGE_BYTES`, sent as fast as the sender reads it."""

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        head = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
        await self.write(writer, f"{head}Content-Length: {HUGE_BYTES}\r\n\r\n".encode())
        chunk = b"x" * HUGE_CHUNK
        for _ in range(HUGE_BYTES // HUGE_CHUNK):
            await self.write(writer, chunk)
