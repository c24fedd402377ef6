"""Hostile input on every route of the running service: never a 5xx, never a traceback.

Hypothesis generates deliveries against real uvicorn (the bounded httptools
protocol ``regsweep serve`` runs) and real Redis: JSON nested thousands deep,
numbers of thousands of digits, bodies in UTF-16 and broken UTF-8, lone
surrogates, absurd timestamps (the year 10000, 400-digit ``webhook-timestamp``),
oversized ids and fields, random bytes in the request head. Signatures and
tokens are right most of the time, so the input reaches the parsers behind the
checks. The registry hook must answer 202 to anything carrying the right token
(a 4xx would make the registry retry forever); the others answer 2xx or 4xx.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from tests.harness import service as h
from tests.harness.sinks import RedisListSink
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import State

TOKEN = "fuzz-registry-Zq9"
GITHUB_SECRET = "fuzz-github-Hy7"
GITLAB_TOKEN = "fuzz-gitlab-Km2"
SIGNING_KEY = "whsec_" + base64.b64encode(b"fuzz-signing-key-0123456789abcd").decode()
API_TOKEN = "fuzz-api-Rt4"
LIMIT = 256 * 1024
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[httpx.Client, int]]:
    """Every hook and the API enabled; yields a client and the port."""
    prefix = h.unique_prefix()
    hooks = HookSettings(
        registry_token=Secret(TOKEN),
        github_secret=Secret(GITHUB_SECRET),
        gitlab_token=Secret(GITLAB_TOKEN),
        gitlab_signing_key=Secret(SIGNING_KEY),
        api_token=Secret(API_TOKEN),
        body_limit=LIMIT,
        head_timeout=timedelta(seconds=2),
        body_timeout=timedelta(seconds=1),
    )
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"), hooks=hooks, policies=(h.CI_POLICY,)
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    try:
        with (
            h.running(create_app(config, sink=sink, state=state), hooks) as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            yield http, int(url.rsplit(":", 1)[1])
    finally:
        h.delete_prefix(client, prefix)
        client.close()


@pytest.fixture
def clean_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything logged an exception, a traceback or an error."""
    caplog.set_level(logging.INFO)
    yield
    bad = [
        r
        for r in caplog.records
        if r.exc_info or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR
    ]
    assert not bad, [r.getMessage() for r in bad[:5]]


# --- strategies ------------------------------------------------------------------------

HUGE_INT = st.integers(min_value=1, max_value=4000).map(lambda n: "9" * n)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
JSON_VALUE = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
ABSURD_TIMES = st.sampled_from(
    [
        "10000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "1970-01-01T00:00:00Z",
        "2025-13-45T99:99:99Z",
        "",
        "9" * 400,
        "2025-03-01T10:00:00.123456789123456789Z",
    ]
)
TIMESTAMPS = st.one_of(
    ABSURD_TIMES,
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-23, minutes=-59))]),
    ).map(lambda d: d.isoformat()),
    st.text(max_size=30),
)
ANY = st.one_of(JSON_VALUE, HUGE_INT.map(int), st.text(max_size=300))


def deep(depth: int, opener: str) -> str:
    """JSON nested ``depth`` levels: arrays, or objects of objects."""
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def registry_event(draw: st.DrawFn) -> dict[str, Any]:
    target = {
        "mediaType": draw(st.one_of(st.sampled_from([h.OCI_MANIFEST, "x" * 5000]), ANY)),
        "digest": draw(st.one_of(st.just(h.digest_of("x")), ANY)),
        "repository": draw(st.one_of(st.sampled_from(["team/web", "A" * 300, "a/../b"]), ANY)),
        "tag": draw(st.one_of(st.just("v1"), ANY)),
        "size": draw(st.one_of(st.integers(min_value=-1, max_value=2**70), ANY)),
        "url": draw(st.one_of(st.just("http://r/v2/team/web/manifests/x"), ANY)),
    }
    return {
        "id": draw(st.one_of(st.uuids().map(str), st.text(max_size=400), ANY)),
        "timestamp": draw(TIMESTAMPS),
        "action": draw(st.one_of(st.sampled_from(["push", "delete", "pull", "mount"]), ANY)),
        "target": draw(st.one_of(st.just(target), ANY)),
    }


def encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="surrogatepass")


BODIES = st.one_of(
    st.lists(registry_event(), max_size=5).map(lambda e: json.dumps({"events": e}).encode()),
    st.builds(
        lambda depth, opener: ('{"events": ' + deep(depth, opener) + "}").encode(),
        st.sampled_from([900, 1000, 5000, 60000]),
        st.sampled_from(["[", "{"]),
    ),
    HUGE_INT.map(lambda n: ('{"events": [{"id": "x", "target": {"size": ' + n + "}}]}").encode()),
    st.builds(
        encode,
        st.one_of(JSON_VALUE.map(json.dumps), st.just('{"a": "\\ud800"}')),
        st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig", "latin-1"]),
    ),
    st.binary(max_size=200),
    JSON_VALUE.map(lambda v: json.dumps(v).encode()),
)
#: What an HTTP client lets through in a header value (h11 refuses edge blanks and controls;
#: the raw-socket test below sends those).
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=300,
).map(lambda t: t.strip(" \t"))


def github_payload(draw: st.DrawFn) -> bytes:
    shaped = {
        "action": draw(st.one_of(st.just("closed"), ANY)),
        "ref": draw(st.one_of(st.just("refs/heads/main"), ANY)),
        "ref_type": draw(st.one_of(st.just("branch"), ANY)),
        "deleted": draw(st.one_of(st.just(True), ANY)),
        "repository": {"full_name": draw(st.one_of(st.just("acme/web"), ANY))},
        "pull_request": {
            "number": draw(st.one_of(st.integers(min_value=-5, max_value=2**64), ANY)),
            "head": {"ref": draw(st.one_of(st.just("feature"), st.just("\ud800"), ANY))},
        },
    }
    return draw(st.one_of(st.just(json.dumps(shaped).encode()), BODIES))


# --- the routes ------------------------------------------------------------------------


def assert_not_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text


@FUZZ
@given(body=BODIES, content_type=st.sampled_from([h.V1, h.V2, "application/json", "text/x"]))
def test_registry_hook_answers_202_to_anything_with_the_right_token(
    service: tuple[httpx.Client, int], clean_log: None, body: bytes, content_type: str
) -> None:
    """Whatever the body, the registry hook answers 202 (usable events queued, the rest
    dead-lettered; a 4xx or 5xx would be retried forever), or 413 over the body limit."""
    http, _ = service
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    response = http.post("/hooks/registry", content=body, headers=headers)
    expected = 413 if len(body) > LIMIT else 202
    assert response.status_code == expected, (response.status_code, response.text[:300])


@st.composite
def github_delivery(draw: st.DrawFn) -> tuple[bytes, dict[bytes, bytes]]:
    body = github_payload(draw)
    signature = "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": draw(st.sampled_from(["application/json", "text/plain"])),
        "X-GitHub-Event": draw(
            st.one_of(st.sampled_from(["pull_request", "delete", "push", "ping"]), HEADER_TEXT)
        ),
        "X-GitHub-Delivery": draw(st.one_of(st.uuids().map(str), HEADER_TEXT)),
        "X-Hub-Signature-256": draw(st.one_of(st.just(signature), HEADER_TEXT)),
    }
    return body, {k.encode(): v.encode("latin-1") for k, v in headers.items() if v}


@FUZZ
@given(delivery=github_delivery())
def test_github_hook_answers_2xx_or_4xx(
    service: tuple[httpx.Client, int], clean_log: None, delivery: tuple[bytes, dict[bytes, bytes]]
) -> None:
    """Signed or not, well-shaped or not, a GitHub delivery never gets a 5xx."""
    http, _ = service
    body, headers = delivery
    assert_not_5xx(http.post("/hooks/github", content=body, headers=headers))


@st.composite
def gitlab_delivery(draw: st.DrawFn) -> tuple[bytes, dict[bytes, bytes]]:
    body = github_payload(draw)
    msg_id = draw(st.one_of(st.uuids().map(lambda u: f"msg_{u}"), HEADER_TEXT))
    timestamp = draw(
        st.one_of(
            st.just(str(int(time.time()))),
            st.integers(min_value=1, max_value=500).map(lambda n: "9" * n),
            HEADER_TEXT,
        )
    )
    key = base64.b64decode(SIGNING_KEY.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode("latin-1") + body
    signature = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": draw(
            st.one_of(st.sampled_from(["Merge Request Hook", "Push Hook"]), HEADER_TEXT)
        ),
        "X-Gitlab-Token": draw(st.one_of(st.just(GITLAB_TOKEN), HEADER_TEXT)),
        "Idempotency-Key": draw(HEADER_TEXT),
        "webhook-id": msg_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": draw(st.one_of(st.just(signature), HEADER_TEXT)),
    }
    return body, {k.encode(): v.encode("latin-1") for k, v in headers.items() if v}


@FUZZ
@given(delivery=gitlab_delivery())
def test_gitlab_hook_answers_2xx_or_4xx(
    service: tuple[httpx.Client, int], clean_log: None, delivery: tuple[bytes, dict[bytes, bytes]]
) -> None:
    """Tokens, Standard Webhooks headers (400-digit timestamps included) and payloads of any
    shape never give a 5xx."""
    http, _ = service
    body, headers = delivery
    assert_not_5xx(http.post("/hooks/gitlab", content=body, headers=headers))


JOB_BODIES = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.one_of(st.sampled_from(["prune", "sweep", "gc", "restore"]), ANY),
            "repository": st.one_of(st.just("team/web"), ANY),
            "dry_run": st.one_of(st.booleans(), ANY),
            "digest": st.one_of(st.just(h.digest_of("d")), ANY),
        }
    ).map(lambda d: json.dumps(d).encode()),
    BODIES,
)


@FUZZ
@given(
    body=JOB_BODIES,
    job_id=st.one_of(st.text(max_size=80), st.just("0" * 32)),
    token=st.sampled_from([API_TOKEN, "wrong"]),
)
def test_job_api_answers_2xx_or_4xx(
    service: tuple[httpx.Client, int], clean_log: None, body: bytes, job_id: str, token: str
) -> None:
    """Job requests of any shape and job ids of any characters never give a 5xx."""
    http, _ = service
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert_not_5xx(http.post("/api/v1/jobs", content=body, headers=headers))
    assert_not_5xx(http.get(f"/api/v1/jobs/{quote(job_id, safe='')}", headers=headers))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    path=st.one_of(
        st.sampled_from(
            ["/healthz", "/readyz", "/metrics", "/hooks/registry", "/hooks/github", "/api/v1/jobs"]
        ),
        st.text(max_size=60).map(lambda t: "/" + quote(t, safe="/%")),
    ),
)
def test_any_method_on_any_path_is_never_5xx(
    service: tuple[httpx.Client, int], clean_log: None, method: str, path: str
) -> None:
    """Unknown routes and methods are 404/405 in JSON, never a 5xx."""
    http, _ = service
    assert_not_5xx(http.request(method, path))


@FUZZ
@given(head=st.binary(min_size=1, max_size=600))
def test_random_bytes_in_the_request_head_never_give_a_5xx(
    service: tuple[httpx.Client, int], clean_log: None, head: bytes
) -> None:
    """Random bytes after a request line (headers of any bytes, no end, or garbage) are
    answered 4xx or closed by the server; never a 5xx, never a traceback."""
    _, port = service
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /hooks/registry HTTP/1.1\r\n" + head + b"\r\n\r\n")
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            answer = sock.recv(64)
            if answer:
                assert not answer.startswith(b"HTTP/1.1 5"), answer
