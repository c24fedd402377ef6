"""Registry auth: the flow driven by hand (a unit, no socket) and real htpasswd/token registries."""

from __future__ import annotations

import base64
import logging
from collections.abc import Generator
from urllib.parse import parse_qs

import httpx
import pytest

from tests.harness.auth import AuthRegistry
from worker import oci
from worker.errors import RegistryAuthError, RegistryUnavailable
from worker.registry.auth import CATALOG_SCOPE, RegistryAuth, merge_scopes, required_scope
from worker.registry.client import RegistryClient, Removal
from worker.settings.model import RegistrySettings, Secret

pytestmark = pytest.mark.anyio

REGISTRY = "http://registry.test"
REALM = "http://auth.test/token"
TOKEN_CHALLENGE = f'Bearer realm="{REALM}",service="reg",scope="{{scope}}"'

Flow = Generator[httpx.Request, httpx.Response, None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def challenge(scope: str) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": TOKEN_CHALLENGE.format(scope=scope)})


def token_answer(token: str, **extra: object) -> httpx.Response:
    return httpx.Response(200, json={"token": token, **extra})


def start(auth: RegistryAuth, method: str, path: str) -> tuple[Flow, httpx.Request]:
    flow = auth.auth_flow(httpx.Request(method, REGISTRY + path))
    return flow, next(flow)


def finish(flow: Flow, response: httpx.Response) -> None:
    with pytest.raises(StopIteration):
        flow.send(response)


def token_params(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.url.query.decode())


def fetch_token(auth: RegistryAuth, method: str, path: str, token: str, **extra: object) -> None:
    """Run one request through a Bearer challenge and a token answer to the end."""
    flow, _ = start(auth, method, path)
    token_request = flow.send(
        challenge(required_scope(httpx.Request(method, REGISTRY + path)) or "")
    )
    retried = flow.send(token_answer(token, **extra))
    assert retried.headers["Authorization"] == f"Bearer {token}"
    finish(flow, httpx.Response(200))
    assert token_request.url.host == "auth.test"


# -- the flow as a unit ------------------------------------------------------------


def test_scopes_for_requests() -> None:
    """Reads need pull, writes ask for pull,push,delete, the catalog its own scope, /v2/ none."""

    def scope(method: str, path: str) -> str | None:
        return required_scope(httpx.Request(method, REGISTRY + path))

    assert scope("GET", "/v2/a/b/manifests/v1") == "repository:a/b:pull"
    assert scope("HEAD", "/v2/a/manifests/x/blobs/sha256:00") == "repository:a/manifests/x:pull"
    assert scope("DELETE", "/v2/a/b/manifests/sha256:00") == "repository:a/b:pull,push,delete"
    assert scope("PUT", "/v2/a/b/blobs/uploads/123") == "repository:a/b:pull,push,delete"
    assert scope("GET", "/v2/a/b/tags/list") == "repository:a/b:pull"
    assert scope("GET", "/v2/_catalog") == CATALOG_SCOPE
    assert scope("GET", "/v2/") is None
    assert merge_scopes("repository:a:pull,push,delete", "repository:a:delete", "x:y:z") == [
        "repository:a:pull,push,delete",
        "x:y:z",
    ]


def test_basic_challenge_is_answered_then_sent_up_front() -> None:
    """A Basic challenge is answered with the credentials, which later requests carry up front."""
    auth = RegistryAuth("user", "pw")
    flow, first = start(auth, "GET", "/v2/")
    assert "Authorization" not in first.headers
    retried = flow.send(httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'}))
    expected = "Basic " + base64.b64encode(b"user:pw").decode()
    assert retried.headers["Authorization"] == expected
    finish(flow, httpx.Response(200))
    _, second = start(auth, "GET", "/v2/a/tags/list")
    assert second.headers["Authorization"] == expected


def test_basic_refused_credentials_end_the_flow() -> None:
    """Credentials refused after a Basic retry end the flow: the 401 goes to the caller, no loop."""
    auth = RegistryAuth("user", "wrong")
    flow, _ = start(auth, "GET", "/v2/")
    refused = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    flow.send(refused)
    finish(flow, refused)


def test_bearer_token_fetched_with_service_scope_and_credentials() -> None:
    """A Bearer challenge fetches a token from the realm (service, scope, Basic) and retries."""
    auth = RegistryAuth("user", "pw")
    flow, _ = start(auth, "GET", "/v2/a/b/manifests/v1")
    token_request = flow.send(challenge("repository:a/b:pull"))
    assert str(token_request.url).startswith(REALM)
    assert token_params(token_request) == {"service": ["reg"], "scope": ["repository:a/b:pull"]}
    assert token_request.headers["Authorization"].startswith("Basic ")
    retried = flow.send(token_answer("tok-1"))
    assert retried.headers["Authorization"] == "Bearer tok-1"
    finish(flow, httpx.Response(200))


def test_anonymous_token_request_carries_no_credentials() -> None:
    """Without credentials the token is asked for anonymously (public pulls) and accepted."""
    auth = RegistryAuth()
    flow, _ = start(auth, "GET", "/v2/a/b/tags/list")
    token_request = flow.send(challenge("repository:a/b:pull"))
    assert "Authorization" not in token_request.headers
    assert flow.send(token_answer("anon")).headers["Authorization"] == "Bearer anon"


def test_write_asks_for_the_wide_scope() -> None:
    """A DELETE challenged for ``delete`` asks for pull,push,delete: one token for an untag."""
    auth = RegistryAuth("user", "pw")
    flow, _ = start(auth, "DELETE", "/v2/a/b/manifests/sha256:00")
    token_request = flow.send(challenge("repository:a/b:delete"))
    assert token_params(token_request)["scope"] == ["repository:a/b:pull,push,delete"]
    flow.send(token_answer("wide"))
    finish(flow, httpx.Response(202))
    for method, path in [("PUT", "/v2/a/b/manifests/t"), ("HEAD", "/v2/a/b/manifests/t")]:
        _, request = start(auth, method, path)
        assert request.headers["Authorization"] == "Bearer wide"


def test_tokens_cached_per_scope() -> None:
    """A cached token is sent up front for its scope only; another repository gets its own."""
    auth = RegistryAuth("user", "pw")
    fetch_token(auth, "GET", "/v2/a/tags/list", "tok-a")
    _, again = start(auth, "GET", "/v2/a/manifests/v1")
    assert again.headers["Authorization"] == "Bearer tok-a"
    _, other = start(auth, "GET", "/v2/b/manifests/v1")
    assert "Authorization" not in other.headers
    fetch_token(auth, "GET", "/v2/_catalog", "tok-cat")
    _, catalog = start(auth, "GET", "/v2/_catalog")
    assert catalog.headers["Authorization"] == "Bearer tok-cat"


def test_access_token_field_and_expiry() -> None:
    """``access_token`` is accepted, ``expires_in`` is honoured, and 60 s is assumed without it."""
    clock = FakeClock()
    auth = RegistryAuth("user", "pw", clock=clock)
    flow, _ = start(auth, "GET", "/v2/a/tags/list")
    flow.send(challenge("repository:a:pull"))
    retried = flow.send(httpx.Response(200, json={"access_token": "acc", "expires_in": 300}))
    assert retried.headers["Authorization"] == "Bearer acc"
    clock.now += 290
    assert start(auth, "GET", "/v2/a/tags/list")[1].headers["Authorization"] == "Bearer acc"
    clock.now += 10
    assert "Authorization" not in start(auth, "GET", "/v2/a/tags/list")[1].headers
    fetch_token(auth, "GET", "/v2/b/tags/list", "short")
    clock.now += 50
    assert start(auth, "GET", "/v2/b/tags/list")[1].headers["Authorization"] == "Bearer short"
    clock.now += 10
    assert "Authorization" not in start(auth, "GET", "/v2/b/tags/list")[1].headers


def test_refused_cached_token_is_replaced_once() -> None:
    """A 401 on a cached token fetches one new token and retries once; a refused new one ends it."""
    auth = RegistryAuth("user", "pw")
    fetch_token(auth, "GET", "/v2/a/tags/list", "stale")
    flow, first = start(auth, "GET", "/v2/a/tags/list")
    assert first.headers["Authorization"] == "Bearer stale"
    token_request = flow.send(challenge("repository:a:pull"))
    assert token_request.url.host == "auth.test"
    assert flow.send(token_answer("fresh")).headers["Authorization"] == "Bearer fresh"
    finish(flow, challenge("repository:a:pull"))
    assert start(auth, "GET", "/v2/a/tags/list")[1].headers["Authorization"] == "Bearer fresh"


def test_token_server_failures_are_errors() -> None:
    """Refused credentials at the realm raise RegistryAuthError, a 5xx there RegistryUnavailable."""
    for answer, error in [(401, RegistryAuthError), (503, RegistryUnavailable)]:
        flow, _ = start(RegistryAuth("user", "pw"), "GET", "/v2/a/tags/list")
        flow.send(challenge("repository:a:pull"))
        with pytest.raises(error):
            flow.send(httpx.Response(answer, json={}))


def test_secrets_never_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Neither the password nor a token shows in the auth's repr or in its debug log."""
    caplog.set_level(logging.DEBUG, logger="worker.registry")
    auth = RegistryAuth("user", "hunter2-password")
    fetch_token(auth, "GET", "/v2/a/tags/list", "secret-token-value")
    text = repr(auth) + caplog.text
    assert caplog.records, "the token fetch should have been logged"
    assert "hunter2" not in text and "secret-token-value" not in text


async def test_flow_through_an_async_client() -> None:
    """The flow runs inside httpx.AsyncClient (MockTransport: a unit of the flow, no socket)."""
    realm_calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            realm_calls.append(request.url.params["scope"])
            return token_answer("tok")
        if request.headers.get("Authorization") != "Bearer tok":
            return challenge("repository:a:pull")
        return httpx.Response(200, json={"name": "a", "tags": ["v1"]})

    settings = RegistrySettings(url=REGISTRY, username="user", password=Secret("pw"))
    transport = httpx.MockTransport(handler)
    async with RegistryClient.from_settings(settings, transport=transport) as client:
        assert await client.tags("a") == ["v1"]
        assert await client.tags("a") == ["v1"]
    assert realm_calls == ["repository:a:pull"]


# -- the real registry flavours ----------------------------------------------------------


def settings_for(registry: AuthRegistry, password: str | None = None) -> RegistrySettings:
    return RegistrySettings(
        url=registry.url,
        username=registry.username,
        password=Secret(password if password is not None else registry.password),
    )


async def push_and_untag(client: RegistryClient, repo: str) -> str:
    """Push one tiny image under two tags, untag one (2.8: the dummy method), return its digest."""
    config = await client.upload_blob(repo, b'{"os":"linux"}')
    raw = (
        f'{{"schemaVersion":2,"mediaType":"{oci.OCI_MANIFEST}","config":{{"mediaType":'
        f'"{oci.OCI_CONFIG}","digest":"{config}","size":14}},"layers":[]}}'
    ).encode()
    digest = await client.put_manifest(repo, "old", oci.OCI_MANIFEST, raw)
    await client.put_manifest(repo, "keep", oci.OCI_MANIFEST, raw)
    assert await client.delete_tag(repo, "old", digest) is Removal.DELETED
    assert await client.tags(repo) == ["keep"]
    return digest


async def test_htpasswd_registry(registry_htpasswd: AuthRegistry, repo_name: str) -> None:
    """Against real htpasswd auth the client pushes, lists, untags and deletes with Basic."""
    async with RegistryClient.from_settings(settings_for(registry_htpasswd)) as client:
        await client.ping()
        digest = await push_and_untag(client, repo_name)
        assert repo_name in await client.catalog()
        assert await client.delete_manifest(repo_name, digest) is Removal.DELETED


async def test_htpasswd_wrong_password(registry_htpasswd: AuthRegistry) -> None:
    """A wrong htpasswd password is RegistryAuthError at once, never retried into a lockout."""
    settings = settings_for(registry_htpasswd, password="wrong")
    async with RegistryClient.from_settings(settings) as client:
        with pytest.raises(RegistryAuthError) as info:
            await client.ping()
    assert info.value.status == 401


async def test_token_registry_scopes_and_caching(
    registry_token_reset: AuthRegistry, repo_name: str
) -> None:
    """Real token auth: the wide write scope, the catalog scope, and cached tokens reused."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    async with RegistryClient.from_settings(settings_for(registry_token_reset)) as client:
        digest = await push_and_untag(client, repo_name)
        assert repo_name in await client.catalog()
        assert await client.delete_manifest(repo_name, digest) is Removal.DELETED
        assert await client.head_manifest(repo_name, "keep") is None
    scopes = issuer.requested_scopes()
    assert f"repository:{repo_name}:pull,push,delete" in scopes
    assert CATALOG_SCOPE in scopes
    # Upload, 2 PUTs, untag (HEAD, DELETE, HEAD, PUT, DELETE), tags, delete, HEAD: one write
    # token covers them all; the catalog needs its own.
    assert len(issuer.requests) == 2
    assert all(
        r.status == 200 and r.username == registry_token_reset.username for r in issuer.requests
    )


async def test_token_registry_pull_only_user(
    registry_token_reset: AuthRegistry, repo_name: str
) -> None:
    """A pull-only account reads, and a delete it is not granted is RegistryAuthError."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    async with RegistryClient.from_settings(settings_for(registry_token_reset)) as writer:
        config = await writer.upload_blob(repo_name, b"{}")
    reader = RegistrySettings(
        url=registry_token_reset.url, username="reader", password=Secret(issuer.users["reader"])
    )
    async with RegistryClient.from_settings(reader) as client:
        assert await client.blob_exists(repo_name, config) is True
        with pytest.raises(RegistryAuthError):
            await client.delete_manifest(repo_name, config)


async def test_token_registry_refused_tokens(
    registry_token_reset: AuthRegistry, repo_name: str
) -> None:
    """Tokens the registry refuses (expired) give RegistryAuthError after one re-fetch, no loop."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    issuer.issue_expired = True
    async with RegistryClient.from_settings(settings_for(registry_token_reset)) as client:
        with pytest.raises(RegistryAuthError):
            await client.tags(repo_name)
    assert len(issuer.requests) == 1
