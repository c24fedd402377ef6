"""A TCP proxy that breaks HTTP/1.1 exchanges on purpose: the faults a real network makes.

Put it between a client and a real server (the registry, the service) and tell
it which exchange to break and how::

    with FaultyProxy(("127.0.0.1", registry.port)) as proxy:
        proxy.add(Rule(Fault.DROP_ANSWER, method="DELETE"))    # the first DELETE's answer
        proxy.add(Rule(Fault.CUT_ANSWER, path="/tags/list", after=40, nth=2))
        proxy.add(Rule(before=stop_redis, method="DELETE", nth=2))  # a fault elsewhere, timed
        proxy.add(Rule(Fault.DROP_ANSWER, method="DELETE", nth=3, then=restart_registry))
        ...talk to proxy.url...
        proxy.refuse()    # nothing listens: connects are refused
        proxy.listen()    # and back

It parses just enough HTTP/1.1 to find where each request and answer ends
(Content-Length, chunked, HEAD and bodiless statuses), so keep-alive clients
work and a rule can pick "the second DELETE" rather than "the second packet".
Each client connection gets its own thread and its own upstream connection;
when either side closes, both do. ``exchanges`` records what went through.

Faults (``Fault``):

- ``DROP_ANSWER``: forward the request, read the server's whole answer, then
  close the client's connection without sending a byte of it (the server
  acted; the client never learns).
- ``CUT_ANSWER``: forward the request, send the first ``after`` bytes of the
  answer, then close.
- ``CUT_REQUEST``: send the server the first ``after`` bytes of the request,
  then close both sides (the server never gets a whole request).
- ``RESET``: close the client's connection without forwarding anything.

``date_header`` replaces every answer's ``Date`` with that text (a garbled or impossible one),
and ``date_offset`` moves it by that much: the registry's clock as
a host whose clock is off would show it (the real registry's clock cannot be moved on a
shared machine, and Go reads it through the vDSO, past libfaketime).

A rule without a fault only runs its callbacks. ``before`` runs before the
request is forwarded; ``then`` once the fault happened and the client's
connection is closed (or, without a fault, once the answer was passed on).
Both run on the connection's thread and hold up that connection only.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from types import TracebackType
from typing import Final, Self

#: Longest request or answer head the proxy accepts.
MAX_HEAD: Final = 64 * 1024
RECV_SIZE: Final = 65536
BODILESS: Final = frozenset({204, 304})


class Fault(StrEnum):
    DROP_ANSWER = "drop-answer"
    CUT_ANSWER = "cut-answer"
    CUT_REQUEST = "cut-request"
    RESET = "reset"


@dataclass(frozen=True)
class Exchange:
    """One request the proxy saw and what became of it."""

    method: str
    target: str
    #: The server's status (None: no answer came, or none was asked for).
    status: int | None
    fault: Fault | None = None
    #: The server said ``Connection: close``.
    closing: bool = False


Callback = Callable[[Exchange], None]


@dataclass
class Rule:
    """Which requests to break and how: the ``nth`` matching request (1-based) and the
    ``times - 1`` matching ones after it. ``method`` is compared exactly, ``path`` is a
    regular expression searched in the request target."""

    fault: Fault | None = None
    method: str | None = None
    path: str | None = None
    nth: int = 1
    times: int = 1
    #: CUT_ANSWER / CUT_REQUEST: bytes passed on before the cut.
    after: int = 0
    before: Callback | None = None
    then: Callback | None = None
    #: Requests that matched so far (the proxy counts under its lock).
    matched: int = 0
    #: Requests this rule acted on.
    fired: list[Exchange] = field(default_factory=list)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or re.search(self.path, target) is not None
        )

    def due(self) -> bool:
        return self.nth <= self.matched < self.nth + self.times


class _Closed(Exception):
    """The other side closed the connection."""


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _fill(self) -> None:
        data = self._sock.recv(RECV_SIZE)
        if not data:
            raise _Closed
        self._buffer += data

    def until(self, marker: bytes, limit: int = MAX_HEAD) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            if len(self._buffer) > limit:
                raise _Closed
            self._fill()
        end += len(marker)
        data, self._buffer = self._buffer[:end], self._buffer[end:]
        return data

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def rest(self) -> bytes:
        """Everything until the peer closes (an answer without a length)."""
        with contextlib.suppress(_Closed):
            while True:
                self._fill()
        data, self._buffer = self._buffer, b""
        return data

    def chunked(self) -> bytes:
        """A chunked body, raw (sizes, chunks and trailers as sent)."""
        out = b""
        while True:
            line = self.until(b"\r\n")
            out += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer = self.until(b"\r\n")
                out += trailer
                while trailer != b"\r\n":
                    trailer = self.until(b"\r\n")
                    out += trailer
                return out
            out += self.exactly(size + 2)


def _head(raw: bytes) -> tuple[str, dict[str, str]]:
    """The start line and the headers (names lower-cased) of a message head."""
    lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _body(reader: _Reader, headers: dict[str, str], *, to_close: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return reader.chunked()
    if "content-length" in headers:
        return reader.exactly(int(headers["content-length"]))
    return reader.rest() if to_close else b""


class FaultyProxy:
    """Listens on 127.0.0.1 (a free port, kept across :meth:`refuse`/:meth:`listen`)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rules: list[Rule] | None = None,
        *,
        date_offset: timedelta | None = None,
        date_header: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = list(rules or [])
        self.date_offset: timedelta | str | None = date_header or date_offset
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.listen()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def listen(self) -> None:
        """Accept connections (again, on the same port after :meth:`refuse`)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop_accepting(self) -> None:
        """Stop listening: new connects are refused, open connections carry on."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def refuse(self) -> None:
        """Stop listening and close every open connection: connects are refused."""
        self.stop_accepting()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self.refuse()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refused or closed
            self._spawn(self._serve, client)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        connection = _Connection(
            client, _Reader(client), self.upstream, self._track, self.date_offset
        )
        rule: Rule | None = None
        seen: Exchange | None = None
        try:
            while True:
                request, method, target = connection.request()
                rule = self._rule_for(method, target)
                seen = connection.exchange(request, method, target, rule)
                self._record(rule, seen)
                if seen.fault is not None or seen.closing:
                    break
                _then(rule, seen)
                rule = None
        except (_Closed, OSError, ValueError):
            return
        finally:
            with self._lock:
                self._open.difference_update(connection.close())
        _then(rule, seen)  # the client has seen its connection close

    def _rule_for(self, method: str, target: str) -> Rule | None:
        """The first due rule this request matches (every matching rule counts it)."""
        chosen = None
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.matched += 1
                    if chosen is None and rule.due():
                        chosen = rule
        return chosen

    def _record(self, rule: Rule | None, seen: Exchange) -> None:
        with self._lock:
            self.exchanges.append(seen)
            if rule is not None:
                rule.fired.append(seen)


@dataclass
class _Connection:
    """One client connection and the upstream connection opened for it."""

    client: socket.socket
    reader: _Reader
    upstream: tuple[str, int]
    track: Callable[[socket.socket], None]
    date_offset: timedelta | str | None = None
    server: socket.socket | None = None
    answers: _Reader | None = None

    def request(self) -> tuple[bytes, str, str]:
        """The client's next request, whole, with its method and target."""
        head = self.reader.until(b"\r\n\r\n")
        start, headers = _head(head)
        method, target, *_ = [*start.split(" "), "", ""]
        return head + _body(self.reader, headers, to_close=False), method, target

    def _connect(self) -> tuple[socket.socket, _Reader]:
        if self.server is None or self.answers is None:
            self.server = socket.create_connection(self.upstream, timeout=60)
            self.track(self.server)
            self.answers = _Reader(self.server)
        return self.server, self.answers

    def exchange(self, request: bytes, method: str, target: str, rule: Rule | None) -> Exchange:
        """One request and its answer, broken as ``rule`` says."""
        fault = rule.fault if rule else None
        if rule is not None and rule.before is not None:
            rule.before(Exchange(method, target, None, fault))
        if fault is Fault.RESET:
            return Exchange(method, target, None, fault)
        server, answers = self._connect()
        if fault is Fault.CUT_REQUEST:
            server.sendall(request[: rule.after if rule else 0])
            return Exchange(method, target, None, fault)
        server.sendall(request)
        head = _dated(answers.until(b"\r\n\r\n"), self.date_offset)
        start, headers = _head(head)
        status = int(start.split(" ")[1])
        bodiless = method == "HEAD" or status in BODILESS or status < 200
        answer = head + (b"" if bodiless else _body(answers, headers, to_close=True))
        if fault is Fault.CUT_ANSWER:
            self.client.sendall(answer[: rule.after if rule else 0])
        elif fault is None:
            self.client.sendall(answer)
        closing = "close" in headers.get("connection", "").lower()
        return Exchange(method, target, status, fault, closing)

    def close(self) -> list[socket.socket]:
        """Close both sides; the sockets closed."""
        sockets = [self.client] + ([self.server] if self.server is not None else [])
        for sock in sockets:
            _close(sock)
        return sockets


def _dated(head: bytes, offset: timedelta | str | None) -> bytes:
    """An answer's head with its ``Date`` moved by ``offset``, or replaced by it when it is
    text (unchanged without one)."""
    if offset is None:
        return head

    def moved(match: re.Match[bytes]) -> bytes:
        if isinstance(offset, str):
            return b"Date: " + offset.encode("latin-1")
        at = email.utils.parsedate_to_datetime(match.group(1).decode("latin-1")) + offset
        return b"Date: " + email.utils.format_datetime(at, usegmt=True).encode()

    return re.sub(rb"(?im)^Date: ([^\r\n]+)", moved, head)


def _then(rule: Rule | None, seen: Exchange | None) -> None:
    if rule is not None and seen is not None and rule.then is not None:
        rule.then(seen)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
