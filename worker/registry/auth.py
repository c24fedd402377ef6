"""Registry authentication as an ``httpx.Auth`` flow: Basic, or Bearer via the challenge.

The flow is a plain generator (like httpx's ``DigestAuth``), so it can be
driven by hand in tests without a socket::

    request ──► 401 WWW-Authenticate: Basic ...     ──► retry with Basic
            └─► 401 WWW-Authenticate: Bearer realm, ──► GET realm?service&scope
                                         service,       (Basic if configured)
                                         scope          ──► retry with Bearer

Scopes. The scope a request needs is read from its path: reads of a
repository need ``repository:<name>:pull``; any other method needs
``repository:<name>:pull,push,delete``, and that wider scope is requested even
when the challenge names a narrower one (2.8 names ``...:delete`` for a DELETE
and ``...:pull,push`` for a PUT). One token then covers the whole
dummy-manifest untag (HEAD, PUT, DELETE) instead of three token round-trips,
and a token server grants only what the account may do, so asking wider
never grants more. The catalog needs ``registry:catalog:*``. A challenge
naming some other resource is honoured by requesting it too.

Tokens are cached per scope until ``expires_in`` (default 60 s, the token
spec's) minus a safety margin. A request that carried a cached token and was
refused with 401 gets one fresh token and one retry; a fresh token that is
refused is the caller's 401. Credentials and tokens are never logged and never
appear in a repr.
"""

from __future__ import annotations

import logging
import re
import time
from base64 import b64encode
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Final

import httpx

from worker.errors import RegistryAuthError, RegistryProtocolError, RegistryUnavailable
from worker.registry.diagnosis import shown_url

log = logging.getLogger(__name__)

#: Token lifetime when the token server gives no ``expires_in`` (distribution token spec).
DEFAULT_TOKEN_LIFETIME: Final = 60.0
#: A cached token is dropped this long before it expires, so it never expires in flight.
TOKEN_EXPIRY_MARGIN: Final = 5.0
READ_ACTIONS: Final = ("pull",)
WRITE_ACTIONS: Final = ("pull", "push", "delete")
CATALOG_SCOPE: Final = "registry:catalog:*"
_READ_METHODS: Final = frozenset({"GET", "HEAD"})

# The name may hold "/", so match greedily against the known endpoint suffixes.
_REPOSITORY_PATH: Final = re.compile(
    r"/v2/(?P<name>.+)/(?:manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+|tags/list"
    r"|referrers/[^/]+)$"
)
_CHALLENGE_PARAM: Final = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')

Clock = Callable[[], float]


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {
            m.group(1).lower(): m.group(2) or m.group(3) or ""
            for m in _CHALLENGE_PARAM.finditer(rest)
        }
        return cls(scheme.lower(), params)


def required_scope(request: httpx.Request) -> str | None:
    """The token scope ``request`` needs, or ``None`` for ``/v2/`` and unknown paths."""
    path = request.url.path
    if path.endswith("/v2/_catalog"):
        return CATALOG_SCOPE
    match = _REPOSITORY_PATH.search(path)
    if match is None:
        return None
    actions = READ_ACTIONS if request.method in _READ_METHODS else WRITE_ACTIONS
    return f"repository:{match.group('name')}:{','.join(actions)}"


def merge_scopes(*scopes: str) -> list[str]:
    """Union the actions of scopes naming the same resource, keeping first-seen order."""
    merged: dict[tuple[str, str], list[str]] = {}
    for scope in scopes:
        rtype, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        wanted = merged.setdefault((rtype, name), [])
        wanted.extend(a for a in actions.split(",") if a and a not in wanted)
    return [f"{rtype}:{name}:{','.join(actions)}" for (rtype, name), actions in merged.items()]


def basic_header(username: str, password: str) -> str:
    return "Basic " + b64encode(f"{username}:{password}".encode()).decode("ascii")


def _token_server(response: httpx.Response) -> str:
    try:
        return f"token server {shown_url(response.request.url)}"
    except RuntimeError:  # an answer made without its request (driving the flow by hand)
        return "token server"


@dataclass
class _CachedToken:
    value: str
    expires_at: float


class RegistryAuth(httpx.Auth):
    """Basic or Bearer-token auth for one registry, answering whatever it challenges.

    One instance per process (it holds the token cache); safe to share between
    concurrent requests on one event loop, at worst two requests fetch the same
    token at the same time.
    """

    requires_response_body = True

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._basic = basic_header(username, password or "") if username else None
        self._basic_challenged = False
        self._tokens: dict[str, _CachedToken] = {}
        self._clock = clock

    def __repr__(self) -> str:
        user = "with credentials" if self._basic else "anonymous"
        return f"<RegistryAuth {user}, {len(self._tokens)} cached token(s)>"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scope = required_scope(request)
        cached = self._cached(scope)
        if cached is not None:
            request.headers["Authorization"] = f"Bearer {cached}"
        elif self._basic_challenged and self._basic:
            request.headers["Authorization"] = self._basic
        response = yield request
        if response.status_code != 401:
            return
        challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
        if challenge.scheme == "basic":
            sent_basic = request.headers.get("Authorization") == self._basic
            if self._basic and not sent_basic:
                self._basic_challenged = True
                request.headers["Authorization"] = self._basic
                yield request
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return
        if cached is not None:
            # A cached token was refused (revoked, clock skew): forget it, try once more.
            self._forget(cached)
        yield from self._bearer_retry(request, challenge, scope)

    def _bearer_retry(
        self, request: httpx.Request, challenge: Challenge, scope: str | None
    ) -> Generator[httpx.Request, httpx.Response, None]:
        named = [s for s in challenge.params.get("scope", "").split(" ") if s]
        scopes = merge_scopes(*([scope] if scope else []), *named)
        token_response = yield self._token_request(challenge, scopes)
        token = self._store(token_response, scopes, scope)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _token_request(self, challenge: Challenge, scopes: list[str]) -> httpx.Request:
        params: list[tuple[str, str | int | float | bool | None]] = []
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        params.extend(("scope", s) for s in scopes)
        headers = {"Authorization": self._basic} if self._basic else {}
        return httpx.Request("GET", challenge.params["realm"], params=params, headers=headers)

    def _store(self, response: httpx.Response, scopes: list[str], needed: str | None) -> str:
        """Check the token server's answer and cache its token under every scope it covers."""
        status = response.status_code
        server = _token_server(response)
        if status in (401, 403):
            raise RegistryAuthError(
                f"{server} refused: {status}", status=status, hint=self._refusal()
            )
        if status >= 500:
            raise RegistryUnavailable(f"{server} failed ({status})", status=status)
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryProtocolError(f"token server answered {status} without JSON") from exc
        if status != 200 or not isinstance(token, str) or not token:
            raise RegistryProtocolError(f"token server answered {status} without a token")
        entry = _CachedToken(token, self._clock() + lifetime - TOKEN_EXPIRY_MARGIN)
        for key in {*scopes, needed or " ".join(scopes)}:
            self._tokens[key] = entry
        log.debug("fetched a registry token for %s (expires in %.0f s)", scopes, lifetime)
        return token

    def _refusal(self) -> str:
        if self._basic is None:
            return (
                "it wants credentials and none are configured: set registry.username and "
                "registry.password_env"
            )
        return (
            "wrong user or password (registry.username; the password is read from the variable "
            "registry.password_env names)"
        )

    def _cached(self, scope: str | None) -> str | None:
        if scope is None:
            return None
        keys = [scope]
        if scope.endswith(":" + ",".join(READ_ACTIONS)):
            # A token for the write scope also covers reads of the same repository.
            keys.append(scope.rsplit(":", 1)[0] + ":" + ",".join(WRITE_ACTIONS))
        now = self._clock()
        for key in keys:
            entry = self._tokens.get(key)
            if entry is not None and entry.expires_at > now:
                return entry.value
        return None

    def _forget(self, token: str) -> None:
        for key in [k for k, v in self._tokens.items() if v.value == token]:
            del self._tokens[key]
