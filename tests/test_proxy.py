"""The fault-injecting TCP proxy (tests/harness/proxy.py) breaks exactly what it is told to.

Against the real 2.8.2 registry, and a real uvicorn for a chunked answer.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.harness.images import ImageBuilder
from tests.harness.proxy import Exchange, Fault, FaultyProxy, Rule
from tests.harness.registry import RegistryProcess
from tests.harness.service import running
from worker import oci


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[FaultyProxy]:
    with FaultyProxy(("127.0.0.1", registry.port)) as running_proxy:
        yield running_proxy


@pytest.fixture
def through(proxy: FaultyProxy) -> Iterator[ImageBuilder]:
    """An image builder talking to the registry through the proxy."""
    with ImageBuilder.connect(proxy.url) as builder:
        yield builder


def raw_get(port: int, path: str) -> bytes:
    """A GET on a fresh socket; every byte received until the peer closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


def test_dropped_answer_the_server_acted_on(
    proxy: FaultyProxy, through: ImageBuilder, images: ImageBuilder, repo_name: str
) -> None:
    """DROP_ANSWER on the first DELETE: the registry deleted the manifest, the client saw the
    connection close without an answer, and the next request went through."""
    image = through.image(repo_name, "v1")
    rule = proxy.add(Rule(Fault.DROP_ANSWER, method="DELETE"))
    with pytest.raises(httpx.RemoteProtocolError):
        through.client.delete(f"/v2/{repo_name}/manifests/{image.digest}")
    assert [(e.method, e.status) for e in rule.fired] == [("DELETE", 202)]
    assert images.head(repo_name, image.digest) is None
    assert through.head(repo_name, image.digest) is None


def test_nth_match_only(proxy: FaultyProxy, through: ImageBuilder, repo_name: str) -> None:
    """``nth=2, times=2`` breaks the second and third matching requests and no other; other
    methods are not counted."""
    through.image(repo_name, "v1")
    proxy.add(Rule(Fault.RESET, method="HEAD", nth=2, times=2))
    outcomes = []
    for _ in range(5):
        through.tags(repo_name)  # a GET: not counted
        try:
            through.client.head(f"/v2/{repo_name}/manifests/v1")
            outcomes.append("answered")
        except httpx.TransportError:
            outcomes.append("reset")
    assert outcomes == ["answered", "reset", "reset", "answered", "answered"]


def test_cut_answer_after_n_bytes(proxy: FaultyProxy, registry: RegistryProcess) -> None:
    """CUT_ANSWER passes on exactly ``after`` bytes of the server's answer, then closes."""
    whole = raw_get(registry.port, "/v2/")
    proxy.add(Rule(Fault.CUT_ANSWER, path=r"^/v2/$", after=20))
    assert raw_get(proxy.port, "/v2/") == whole[:20]
    assert raw_get(proxy.port, "/v2/").startswith(b"HTTP/1.1 200 OK")


def test_cut_request_never_reaches_the_server_whole(
    proxy: FaultyProxy, through: ImageBuilder, images: ImageBuilder, repo_name: str
) -> None:
    """CUT_REQUEST on a manifest PUT: the client gets no answer and the registry has no tag."""
    image = images.image(repo_name, "v1")
    proxy.add(Rule(Fault.CUT_REQUEST, method="PUT", path="/manifests/v2$", after=60))
    with pytest.raises(httpx.TransportError):
        through.client.put(
            f"/v2/{repo_name}/manifests/v2",
            content=image.raw,
            headers={"Content-Type": image.media_type},
        )
    assert images.head(repo_name, "v2") is None
    assert images.tags(repo_name) == ["v1"]


def test_refuse_then_listen_on_the_same_port(proxy: FaultyProxy, through: ImageBuilder) -> None:
    """refuse(): connects are refused (open connections closed); listen(): same port again."""
    port = proxy.port
    assert through.client.get("/v2/").status_code == 200
    proxy.refuse()
    with pytest.raises(httpx.ConnectError):
        through.client.get("/v2/")
    proxy.listen()
    assert proxy.port == port
    assert through.client.get("/v2/").status_code == 200


def test_callbacks_run_before_forwarding_and_after_the_client_saw_the_fault(
    proxy: FaultyProxy, through: ImageBuilder, images: ImageBuilder, repo_name: str
) -> None:
    """``before`` sees the registry as it was before the request; ``then`` runs only once the
    client's connection is closed (it waits for the client to have seen that)."""
    image = through.image(repo_name, "v1")
    before_delete: list[bool] = []
    client_failed = threading.Event()
    then_saw: list[bool] = []

    def before(seen: Exchange) -> None:
        before_delete.append(images.head(repo_name, image.digest) is not None)

    def then(seen: Exchange) -> None:
        then_saw.append(client_failed.wait(timeout=10))

    proxy.add(Rule(Fault.DROP_ANSWER, method="DELETE", before=before, then=then))
    with pytest.raises(httpx.RemoteProtocolError):
        through.client.delete(f"/v2/{repo_name}/manifests/{image.digest}")
    client_failed.set()
    proxy.close()
    assert before_delete == [True]
    assert then_saw == [True]


def test_unreachable_upstream_closes_the_client(registry: RegistryProcess) -> None:
    """With nothing listening upstream, the client's request ends without an answer."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with FaultyProxy(("127.0.0.1", port)) as proxy, pytest.raises(httpx.TransportError):
        httpx.get(f"{proxy.url}/v2/", timeout=5)


async def _chunks(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for n in range(50):
            yield f"chunk {n}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


def test_chunked_answers_and_keep_alive() -> None:
    """A chunked answer (uvicorn streaming) is passed on whole, and the same client connection
    carries the next request; the exchange is recorded."""
    app = Starlette(routes=[Route("/stream", _chunks)])
    with running(app) as url:
        port = httpx.URL(url).port
        assert port is not None
        with FaultyProxy(("127.0.0.1", port)) as proxy, httpx.Client(base_url=proxy.url) as c:
            first = c.get("/stream")
            second = c.get("/stream")
    expected = "".join(f"chunk {n}\n" for n in range(50))
    assert first.headers["transfer-encoding"] == "chunked"
    assert first.text == second.text == expected
    assert [(e.method, e.target, e.status) for e in proxy.exchanges] == [
        ("GET", "/stream", 200),
        ("GET", "/stream", 200),
    ]


def test_head_answers_have_no_body(
    proxy: FaultyProxy, through: ImageBuilder, repo_name: str
) -> None:
    """A HEAD's Content-Length is not waited for: HEADs and GETs interleave on one connection."""
    image = through.image(repo_name, "v1")
    for _ in range(3):
        head = through.client.head(
            f"/v2/{repo_name}/manifests/v1", headers={"Accept": oci.MANIFEST_ACCEPT}
        )
        assert int(head.headers["Content-Length"]) == image.size
        assert through.manifest(repo_name, "v1")[0] == image.raw
