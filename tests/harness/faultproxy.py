"""A TCP proxy in front of a real server that cuts connections at a chosen moment, or
slows every request down.

Redis cannot be made to lose one answer, or to go away exactly between two
commands of one request; this proxy can. It forwards bytes both ways until a
client chunk containing an armed marker comes by, then either drops it
unforwarded (``after=False``: the command never ran) or forwards it, waits
for the server's answer and throws that away (``after=True``: the command
ran, its answer was lost). Either way every connection is cut and the proxy
refuses new ones until :meth:`FaultProxy.restore`, as a Redis that went away
would.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from tests.harness.registry import free_port

CHUNK = 65536
#: How long a cut waits for the server's answer it then throws away.
ANSWER_WAIT = 5.0


@dataclass
class Fault:
    marker: bytes
    after: bool
    #: Matching chunks to let through before striking.
    skip: int = 0


class FaultProxy:
    """``127.0.0.1:<port>`` forwarding to ``127.0.0.1:<upstream>``; start, arm, restore, stop."""

    def __init__(self, upstream: int, *, delay: float = 0.0, slow: bytes = b"") -> None:
        self.upstream = upstream
        #: Seconds every client chunk holding ``slow`` waits before it is forwarded.
        self.delay = delay
        self.slow = slow
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        #: While set, client chunks holding it wait here (in order) until release().
        self._gate = b""
        self._gate_unless = b""
        self._held: list[tuple[socket.socket, bytes]] = []
        self._open_gate = threading.Event()
        self._down = False
        self._stopping = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)
        self._close_all()
        self._listener.close()
        self._selector.close()

    def cut_at(self, marker: bytes, *, after: bool, skip: int = 0) -> None:
        """Cut everything at the next client chunk holding ``marker`` after ``skip`` such
        chunks went through (see the module's docstring)."""
        with self._lock:
            self._fault = Fault(marker, after, skip)

    def hold(self, marker: bytes, *, unless: bytes = b"") -> None:
        """Stop forwarding client chunks that hold ``marker`` (and not ``unless``) until
        :meth:`release`: the requests about one thing hang, everything else flows."""
        with self._lock:
            self._gate = marker
            self._gate_unless = unless

    def release(self) -> None:
        """Forward what :meth:`hold` kept back, in order, and hold nothing any more."""
        self._open_gate.set()

    def restore(self) -> None:
        """Accept connections again (and disarm a fault that has not struck)."""
        with self._lock:
            self._down = False
            self._fault = None

    @property
    def down(self) -> bool:
        return self._down

    def _run(self) -> None:
        while not self._stopping:
            if self._open_gate.is_set():
                self._flush_held()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._pump(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._down:
            client.close()
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, None)
        self._peers[client] = server
        self._peers[server] = client
        self._clients.add(client)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        peer = self._peers.get(sock)
        if not data or peer is None:
            self._drop(sock)
            return
        if sock in self._clients and self._strikes(data):
            self._cut(peer, data)
            return
        held = self._gate and self._gate in data
        if held and self._gate_unless and self._gate_unless in data:
            held = False
        if sock in self._clients and held:
            self._held.append((peer, data))
            return
        if sock in self._clients and self.delay and self.slow in data:
            time.sleep(self.delay)
        with contextlib.suppress(OSError):
            peer.setblocking(True)
            peer.sendall(data)
            peer.setblocking(False)

    def _flush_held(self) -> None:
        with self._lock:
            self._gate = b""
            self._open_gate.clear()
        held, self._held = self._held, []
        for peer, data in held:
            with contextlib.suppress(OSError):
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)

    def _strikes(self, data: bytes) -> bool:
        with self._lock:
            if self._fault is None or self._fault.marker not in data:
                return False
            if self._fault.skip:
                self._fault.skip -= 1
                return False
            return True

    def _cut(self, server: socket.socket, data: bytes) -> None:
        with self._lock:
            fault, self._fault = self._fault, None
            self._down = True
        if fault is not None and fault.after:
            # The command runs; its answer is read off the wire and never passed on.
            with contextlib.suppress(OSError):
                server.setblocking(True)
                server.sendall(data)
                server.settimeout(ANSWER_WAIT)
                server.recv(CHUNK)
        self.cuts += 1
        self._close_all()

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for one in (sock, peer):
            if one is None:
                continue
            self._peers.pop(one, None)
            self._clients.discard(one)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(one)
            one.close()

    def _close_all(self) -> None:
        for sock in list(self._peers):
            self._drop(sock)
