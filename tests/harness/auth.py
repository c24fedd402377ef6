"""Registry auth for tests: an htpasswd file, a real token issuer, and a bearer flow.

The token issuer follows the distribution token spec
(https://distribution.github.io/distribution/spec/auth/token/): ``GET /token``
with Basic credentials, ``service`` and any number of ``scope`` parameters
answers ``{"token", "access_token", "expires_in", "issued_at"}``. Tokens are
RS256 JWTs carrying ``access: [{type, name, actions}]``. The registry trusts
them because the issuer's self-signed certificate is its ``rootcertbundle``
and the JWT header's ``kid`` is the libtrust key id of that certificate's key
(2.8 looks ``kid`` up among the bundle's keys; ``x5c`` chains work too but
need a certificate the Go verifier accepts, ``kid`` needs nothing more).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.harness.registry import RegistryProcess

DEFAULT_SERVICE = "regsweep-test-registry"
DEFAULT_ISSUER = "regsweep-test-issuer"
DEFAULT_TOKEN_LIFETIME = 300
#: 2.8 accepts tokens up to 60 s past ``exp``; an "expired" token must be older than that.
REGISTRY_EXP_LEEWAY = 60


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """Write an htpasswd file with bcrypt hashes, the only kind 2.8 accepts."""
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The docker/libtrust key id: base32 of SHA-256(DER SPKI)[:30] in colon groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def self_signed_certificate(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    """A CA-capable self-signed certificate for ``key``, valid for a day around now."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, scope: str) -> Access:
        """Parse ``type:name:a,b``; the name may itself hold ``:`` (a host with a port)."""
        rtype, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        return cls(rtype, name, tuple(a for a in actions.split(",") if a))

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """What the issuer saw and answered for one ``/token`` call."""

    username: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int
    granted: tuple[Access, ...] = ()
    token: str | None = field(default=None, repr=False)


@dataclass
class TokenIssuer:
    """A distribution token server on 127.0.0.1, run in a background thread.

    ``users`` maps username to password. ``permissions`` optionally restricts a
    user to a set of actions (e.g. ``{"pull"}``); users absent from it get
    every action they ask for. Anonymous requests get a token with no access,
    as public token servers do; wrong credentials get 401. Tests that change
    ``permissions``, ``lifetime`` or ``issue_expired`` on the session issuer
    must call :meth:`reset` when done.
    """

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    users: dict[str, str] = field(repr=False)
    permissions: dict[str, frozenset[str]] = field(default_factory=dict)
    service: str = DEFAULT_SERVICE
    issuer: str = DEFAULT_ISSUER
    lifetime: int = DEFAULT_TOKEN_LIFETIME
    #: Sign tokens whose ``exp`` already passed (beyond 2.8's leeway) to force a 401.
    issue_expired: bool = False
    _requests: list[TokenRequest] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _defaults: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, users: Mapping[str, str], **options: Any) -> TokenIssuer:
        """A stopped issuer with a fresh 2048-bit RSA key and certificate."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = self_signed_certificate(key, "regsweep test token issuer")
        return cls(key=key, certificate=certificate, users=dict(users), **options)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Serve ``/token`` on a free loopback port in a daemon thread."""
        self._defaults = {
            "users": dict(self.users),
            "permissions": dict(self.permissions),
            "lifetime": self.lifetime,
            "issue_expired": self.issue_expired,
        }
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        """Forget recorded requests and undo changes to users, permissions and expiry."""
        with self._lock:
            self._requests.clear()
        self.users = dict(self._defaults["users"])
        self.permissions = dict(self._defaults["permissions"])
        self.lifetime = self._defaults["lifetime"]
        self.issue_expired = self._defaults["issue_expired"]

    @property
    def realm(self) -> str:
        assert self._server is not None, "issuer not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def write_certificate(self, path: Path) -> None:
        """Write the PEM certificate the registry's ``rootcertbundle`` points at."""
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def registry_auth_config(self, bundle: Path) -> dict[str, Any]:
        """The ``auth:`` section of a registry config that trusts this issuer."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(bundle),
            }
        }

    # -- users and records ---------------------------------------------------

    def add_user(self, username: str, password: str, actions: Iterable[str] | None = None) -> None:
        """Add a user, optionally limited to ``actions``; :meth:`reset` removes it again."""
        self.users[username] = password
        if actions is not None:
            self.permissions[username] = frozenset(actions)

    @property
    def requests(self) -> list[TokenRequest]:
        """Every ``/token`` call so far (a copy), oldest first."""
        with self._lock:
            return list(self._requests)

    def requested_scopes(self) -> list[str]:
        """Every scope asked for so far, in order, repeats included."""
        return [scope for request in self.requests for scope in request.scopes]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- issuing -------------------------------------------------------------

    def grant(self, username: str | None, scopes: Iterable[str]) -> tuple[Access, ...]:
        """What ``username`` gets for ``scopes``: everything asked, minus what it may not do."""
        if username is None:
            return ()
        allowed = self.permissions.get(username)
        granted = []
        for scope in scopes:
            access = Access.parse(scope)
            actions = tuple(a for a in access.actions if allowed is None or a in allowed)
            granted.append(Access(access.type, access.name, actions))
        return tuple(granted)

    def sign(self, username: str | None, access: tuple[Access, ...]) -> str:
        """An RS256 JWT the registry accepts (``kid`` = libtrust id of the bundle's key)."""
        now = int(time.time())
        expires = now - REGISTRY_EXP_LEEWAY - 60 if self.issue_expired else now + self.lifetime
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": self.service,
            "iat": now,
            "nbf": now - 5,
            "exp": expires,
            "jti": uuid.uuid4().hex,
            "access": [a.claim() for a in access],
        }
        headers = {"kid": libtrust_key_id(self.key.public_key())}
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)

    def authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(credentials acceptable, username); no header at all is an anonymous success."""
        if not authorization:
            return True, None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False, None
        expected = self.users.get(username)
        ok = expected is not None and secrets.compare_digest(expected, password)
        return ok, username

    def answer(self, authorization: str | None, query: str) -> tuple[int, dict[str, Any]]:
        """Handle one ``/token`` request; records it and returns (status, JSON body)."""
        params = parse_qs(query)
        service = params.get("service", [None])[0]
        scopes = tuple(s for value in params.get("scope", []) for s in value.split(" ") if s)
        ok, username = self.authenticate(authorization)
        if not ok:
            self._record(TokenRequest(username, service, scopes, 401))
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        access = self.grant(username, scopes)
        token = self.sign(username, access)
        self._record(TokenRequest(username, service, scopes, 200, access, token))
        issued_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.lifetime,
            "issued_at": issued_at,
        }
        return 200, body

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _handler_for(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class TokenHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
                return
            status, body = issuer.answer(self.headers.get("Authorization"), url.query)
            self._send(status, body)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="regsweep-test-issuer"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the per-request stderr line (it would also print usernames)."""

    return TokenHandler


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """The parameters of a ``Bearer realm="…",service="…",scope="…"`` challenge."""
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "bearer":
        return {}
    params: dict[str, str] = {}
    for part in _split_params(rest):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return params


def _split_params(text: str) -> list[str]:
    """Split on commas outside quotes (scopes hold commas: ``pull,push``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


class HarnessBearerAuth(httpx.Auth):
    """Just enough of the 401 → token → retry dance for the harness's own pushes.

    Not the product's auth flow (that lives in ``worker/registry``): it keeps
    one token per challenge scope and answers each 401 by fetching the scope
    the registry named, with Basic credentials.
    """

    def __init__(self, username: str, password: str) -> None:
        self._basic = httpx.BasicAuth(username, password)
        self._tokens: dict[str, str] = {}
        self._last: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._last is not None:
            request.headers["Authorization"] = f"Bearer {self._last}"
        response = yield request
        challenge = parse_bearer_challenge(response.headers.get("WWW-Authenticate", ""))
        if response.status_code != 401 or "realm" not in challenge:
            return
        scope = challenge.get("scope", "")
        token = self._tokens.get(scope)
        if token is None or token == self._last:
            token_response = yield self._token_request(challenge)
            token_response.read()
            token_response.raise_for_status()
            token = str(token_response.json()["token"])
            self._tokens[scope] = token
        self._last = token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _token_request(self, challenge: dict[str, str]) -> httpx.Request:
        params = {"service": challenge.get("service", "")}
        if challenge.get("scope"):
            params["scope"] = challenge["scope"]
        request = httpx.Request("GET", challenge["realm"], params=params)
        return next(self._basic.auth_flow(request))


@dataclass(frozen=True)
class AuthRegistry:
    """A registry that needs credentials: the process, one user, and the issuer if any."""

    process: RegistryProcess
    username: str
    password: str = field(repr=False)
    issuer: TokenIssuer | None = None

    @property
    def url(self) -> str:
        return self.process.url

    def auth(self) -> httpx.Auth:
        """An httpx auth that gets the harness through this registry's challenge."""
        if self.issuer is None:
            return httpx.BasicAuth(self.username, self.password)
        return HarnessBearerAuth(self.username, self.password)

    def client(self, **kwargs: Any) -> httpx.Client:
        """A synchronous client on this registry's URL, authenticated as the user."""
        return httpx.Client(base_url=self.url, auth=self.auth(), timeout=10.0, **kwargs)
