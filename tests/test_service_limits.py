"""Bounded requests on the real server: head size, head and body time, connections.

Real uvicorn on httptools and uvloop with regsweep's bounded protocol
(``service/protocol.py``), raw sockets playing the hostile clients: a 128 MiB
head, a slowloris, a body that never ends, more connections than allowed.
Each test waits on the server's answer with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
import redis

from service.app import create_app
from tests.harness import service as h
from tests.harness.sinks import RedisListSink
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import State

TOKEN = "limits-token-Pw3"
HOOKS = HookSettings(
    registry_token=Secret(TOKEN),
    head_limit=8192,
    head_timeout=timedelta(seconds=0.5),
    body_timeout=timedelta(seconds=0.5),
    max_connections=100,
)
#: How long a test waits for an answer the server owes within a fraction of it.
ANSWER_DEADLINE = 10.0
HEAD = (
    b"POST /hooks/registry HTTP/1.1\r\nHost: regsweep\r\n"
    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    b"Content-Type: application/vnd.docker.distribution.events.v1+json\r\n"
)


@pytest.fixture
def prefix() -> Iterator[str]:
    value = h.unique_prefix()
    yield value
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    h.delete_prefix(client, value)
    client.close()


@contextlib.contextmanager
def serving(prefix: str, hooks: HookSettings = HOOKS) -> Iterator[tuple[str, int]]:
    """The service bounded by ``hooks``; yields its URL and port."""
    config = Config(registry=RegistrySettings(url="http://127.0.0.1:1"), hooks=hooks)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    sink = RedisListSink.from_url(h.REDIS_TEST_URL, prefix=prefix)
    with h.running(create_app(config, sink=sink, state=state), hooks) as url:
        yield url, int(url.rsplit(":", 1)[1])


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """Read until the server closes: the status and the JSON body of its one answer."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "the server closed without answering"
    return int(head.split()[1]), json.loads(body)


def queued(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    try:
        return client.lrange(f"{prefix}queue:events", 0, -1)  # type: ignore[return-value]
    finally:
        client.close()


def test_oversized_head_is_431_and_never_parsed_past_the_limit(prefix: str) -> None:
    """A head longer than head_limit is answered 431 in JSON, the connection closed;
    a head just under the limit is served."""
    with serving(prefix) as (url, port):
        sock = connect(port)
        sock.sendall(HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n")
        status, body = read_answer(sock)
        sock.close()
        assert status == 431 and body == {"error": "request head is larger than 8192 bytes"}
        fits = {"X-Pad": "a" * 7000, "Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}
        ok = httpx.post(
            f"{url}/hooks/registry", content=h.envelope(h.registry_event()), headers=fits
        )
        assert ok.status_code == 202


def test_128_mib_head_is_cut_off_early_while_others_are_served(prefix: str) -> None:
    """A client streaming a 128 MiB header gets its connection closed long before it has
    sent it all (the service reads at most the limit plus a linger's worth); requests on
    other connections are answered meanwhile."""
    with serving(prefix) as (url, port), httpx.Client(base_url=url, timeout=5) as other:
        sock = connect(port)
        sock.sendall(HEAD + b"X-Big: ")
        sent, chunk = 0, b"a" * (1024 * 1024)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 128 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
                assert other.get("/healthz").status_code == 200
        sock.close()
        print(f"sent {sent / 2**20:.0f} MiB before the server closed")
        # The limit, the 1 MiB linger and both sides' socket buffers: a few MiB at most.
        assert sent < 32 * 1024 * 1024
        assert other.get("/healthz").status_code == 200


def test_head_not_sent_in_time_is_408_and_an_idle_connection_is_closed(prefix: str) -> None:
    """Half a head, then nothing: 408 after head_timeout. A connection that sends nothing
    at all is closed without an answer."""
    with serving(prefix) as (_, port):
        slow = connect(port)
        slow.sendall(HEAD)
        status, body = read_answer(slow)
        assert status == 408 and body == {"error": "request head not received within 0.5s"}
        idle = connect(port)
        assert idle.recv(1024) == b""
        for sock in (slow, idle):
            sock.close()


def test_body_not_sent_in_time_is_408_and_nothing_is_queued(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body shorter than its Content-Length: 408 after body_timeout, the app sees a
    disconnect (no traceback in the log), nothing queued; a body sent in two parts well
    within the timeout is accepted."""
    caplog.set_level(logging.INFO)
    body = h.envelope(h.registry_event(event_id="slow-body"))
    with serving(prefix) as (_, port):
        sock = connect(port)
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        status, answer = read_answer(sock)
        sock.close()
        assert status == 408 and answer == {"error": "request body not received within 0.5s"}
        assert queued(prefix) == []
        split = connect(port)
        split.sendall(HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        split.sendall(body)
        assert split.recv(65536).startswith(b"HTTP/1.1 202")
        split.close()
    assert len(queued(prefix)) == 1
    assert "Traceback" not in caplog.text and "Exception in ASGI" not in caplog.text


def test_connections_beyond_the_limit_get_503_and_the_rest_are_served(prefix: str) -> None:
    """With max_connections open, one more is answered 503 and closed; once some close,
    requests are served again."""
    hooks = replace(HOOKS, head_timeout=timedelta(seconds=30), max_connections=5)
    with serving(prefix, hooks) as (url, port):
        held = [connect(port) for _ in range(5)]
        extra = connect(port)
        status, body = read_answer(extra)
        assert status == 503 and body == {"error": "too many connections, retry later"}
        for sock in [*held, extra]:
            sock.close()
        deadline = time.monotonic() + ANSWER_DEADLINE
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no request served after the held ones closed"


def test_slowloris_connections_are_dropped_and_others_served(prefix: str) -> None:
    """Fifty connections each dribbling a head a few bytes at a time: requests on other
    connections are served meanwhile, and every slow one is answered 408 once its
    head_timeout has passed (the dribble does not reset it)."""
    with serving(prefix) as (url, port), httpx.Client(base_url=url, timeout=5) as other:
        lorises = [connect(port) for _ in range(50)]
        for sock in lorises:
            sock.sendall(b"POST /hooks/registry HTTP/1.1\r\n")
        open_ = list(lorises)
        answered = 0
        deadline = time.monotonic() + ANSWER_DEADLINE
        while open_ and time.monotonic() < deadline:
            assert other.get("/healthz").status_code == 200
            for sock in list(open_):
                try:
                    sock.sendall(b"X: y\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    open_.remove(sock)
                    answered += 1
        assert not open_, f"{len(open_)} slow connections still open"
        assert answered == 50
        for sock in lorises:
            sock.close()


def test_stray_bytes_between_requests_do_not_keep_a_connection_forever(prefix: str) -> None:
    """After a response, bytes that start no request (CRLFs) stop uvicorn's keep-alive
    timer; the head timer closes the connection instead."""
    with serving(prefix) as (_, port):
        sock = connect(port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\r\n")
        assert sock.recv(1024) == b""
        sock.close()


def test_pipelined_requests_and_a_large_body_in_one_read_are_served(prefix: str) -> None:
    """Two requests in one write are both answered, and a body larger than head_limit
    arriving in the same read as its head is not mistaken for a long head."""
    big = h.envelope(*(h.registry_event(event_id=f"big-{i}", tag=f"t{i}") for i in range(40)))
    assert len(big) > HOOKS.head_limit
    with serving(prefix) as (_, port):
        sock = connect(port)
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        post = HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(big) + big
        sock.sendall(one + post)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        sock.close()
    assert data.count(b"HTTP/1.1 200") == 1 and data.count(b"HTTP/1.1 202") == 1
    assert len(queued(prefix)) == 40
