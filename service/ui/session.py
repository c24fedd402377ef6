"""The dashboard's sign-in: a signed session cookie, its CSRF token, failed sign-ins counted.

Signing in trades a token (the viewer token or the API token, typed into a
form, never in a URL) for a session cookie: ``{"role", "csrf"}`` signed and
timestamped by itsdangerous (the signer Starlette's own sessions use; it also
checks the age, so nothing here hand-rolls a MAC). The key is derived from the
configured tokens, so replicas of the service agree without a new secret, and
changing either token signs everyone out. The cookie is ``HttpOnly``,
``SameSite=Strict``, scoped to ``/ui``, and ``Secure`` when the request came over
https (directly, or as a proxy's ``X-Forwarded-Proto`` says: the flag only ever
restricts the cookie, so a forged header can harm no one else).

Every session, a signed-out one included, carries a random CSRF token that each
form repeats (the sign-in form too); a POST whose token does not match, or whose
``Origin`` is another site, is refused. Failed sign-ins are counted per client
address in Redis, with the read API's and the job API's wrong tokens, and refused
for a while beyond :data:`~service.access.SIGNIN_ATTEMPTS`
(:class:`~service.access.SigninLimit`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from service.access import Role
from worker.settings.model import HookSettings

COOKIE: Final = "regsweep_session"
COOKIE_PATH: Final = "/ui"
#: A session lasts this long after sign-in.
SESSION_AGE: Final = timedelta(hours=12)
_SALT: Final = "regsweep dashboard session"


@dataclass(frozen=True)
class Session:
    """Who is signed in (``role`` None: nobody) and the CSRF token their forms carry;
    ``new`` until its cookie is set (a session read from its cookie is not new)."""

    role: Role | None
    csrf: str
    new: bool = True

    @classmethod
    def anonymous(cls) -> Session:
        return cls(None, secrets.token_urlsafe(24))

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    def signed_in(self, role: Role) -> Session:
        """A new session for ``role``, with a new CSRF token (none carried over)."""
        return replace(self, role=role, csrf=secrets.token_urlsafe(24), new=True)


class Sessions:
    """Reads and writes the session cookie for the configured tokens."""

    def __init__(self, hooks: HookSettings) -> None:
        self.hooks = hooks
        self._serializer = URLSafeTimedSerializer(session_key(hooks), salt=_SALT)

    def load(self, request: Request) -> Session:
        """The request's session; a fresh anonymous one when there is none, it is forged or
        expired, or it names a role this deployment no longer has."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return Session.anonymous()
        try:
            data = self._serializer.loads(raw, max_age=int(SESSION_AGE.total_seconds()))
        except BadSignature:
            return Session.anonymous()
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return Session.anonymous()
        role = _role(data.get("r"))
        if role is Role.ADMIN and self.hooks.api_token is None:
            role = None
        return Session(role, data["c"], new=False)

    def save(self, request: Request, response: Response, session: Session) -> None:
        """Set the cookie of a new session (signed in, signed out, or none before). A
        session read from its cookie is never signed again: the signature's time stays
        the sign-in's, so a session used all day (or a copied cookie kept busy) still ends
        :data:`SESSION_AGE` after its sign-in."""
        if not session.new:
            return
        value = self._serializer.dumps(
            {"r": session.role.value if session.role else "", "c": session.csrf}
        )
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(SESSION_AGE.total_seconds()),
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=over_https(request),
        )


def _role(value: object) -> Role | None:
    try:
        return Role(str(value)) if value else None
    except ValueError:
        return None


def session_key(hooks: HookSettings) -> bytes:
    """The cookie's signing key: an HMAC of the configured tokens (both, so a viewer, who
    knows one, cannot sign an admin's cookie while an API token exists)."""
    admin = hooks.api_token.reveal() if hooks.api_token else ""
    viewer = hooks.viewer_token.reveal() if hooks.viewer_token else ""
    material = f"{len(admin)}:{admin}\0{len(viewer)}:{viewer}".encode()
    return hmac.new(material, _SALT.encode(), hashlib.sha256).digest()


def over_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def same_origin(request: Request) -> bool:
    """A POST's ``Origin`` (when the browser sent one) is this service's own."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def csrf_ok(session: Session, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(session.csrf.encode(), given.encode())
