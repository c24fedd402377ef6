"""Who may read and who may change: the viewer token reads, the API token is the admin.

The read API (``GET /api/v1/...``) takes either token as ``Authorization: Bearer``;
the dashboard signs in with either (:mod:`service.ui.session`). Both tokens are
compared in constant time, always both, so the answer's timing does not tell
which one a guess came close to. With neither token configured the read API and
the dashboard are off (404), as an unconfigured hook is; with only the viewer
token the deployment is read-only: no admin exists, so nothing can be changed.

Wrong tokens are counted per client address (:class:`SigninLimit`) wherever they
are tried: the dashboard's sign-in, the read API and the job API share one count,
so no route lets a guesser past the limit the sign-in form sets.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum
from typing import Final, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.hooks.verify import same
from worker.errors import Unverified
from worker.settings.model import HookSettings
from worker.store.signin import SigninFailures
from worker.store.state import State

T = TypeVar("T")

#: Wrong tokens from one address allowed per :data:`SIGNIN_WINDOW`; then 429, even for the
#: right token (the guesser learns nothing more).
SIGNIN_ATTEMPTS: Final = 10
SIGNIN_WINDOW: Final = timedelta(minutes=15)


#: The job API's one client today, and the dashboard's admin, who signs in with it: the
#: token ``hooks.api_token_env`` names (by that key, so the intake's Redis keys hold
#: nothing derived from the token).
API_CLIENT: Final = "api_token"


class Role(StrEnum):
    VIEWER = "viewer"
    ADMIN = "admin"


def enabled(hooks: HookSettings) -> bool:
    """Whether anyone can sign in or read: a viewer or an API token is configured."""
    return hooks.api_token is not None or hooks.viewer_token is not None


def role_for(hooks: HookSettings, token: str) -> Role | None:
    """The role ``token`` grants, or None."""
    admin = hooks.api_token is not None and same(hooks.api_token.reveal(), token)
    viewer = hooks.viewer_token is not None and same(hooks.viewer_token.reveal(), token)
    if admin:
        return Role.ADMIN
    return Role.VIEWER if viewer else None


def bearer_role(hooks: HookSettings, authorization: str | None) -> Role:
    """The role of a read API request's ``Authorization: Bearer``; 404 when reading is off,
    :class:`Unverified` (401) for a missing or wrong token."""
    if not enabled(hooks):
        raise HTTPException(404, "read API disabled: set hooks.viewer_token_env or api_token_env")
    if not authorization:
        raise Unverified("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    role = role_for(hooks, token.strip()) if scheme.lower() == "bearer" else None
    if role is None:
        raise Unverified("invalid bearer token")
    return role


class TooManyGuesses(HTTPException):
    """429: this address tried too many wrong tokens; ``Retry-After`` says for how long."""

    def __init__(self, wait: int) -> None:
        super().__init__(
            429,
            f"too many wrong tokens from this address: try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class SigninLimit:
    """Wrong tokens per client address, in Redis (shared by every replica).

    A wrong token is counted before its answer is chosen (:meth:`failed`, one INCR) and a
    right one is let in only while the count is below the limit (:meth:`blocked_for`, one
    GET): however many guesses arrive at once, at most :data:`SIGNIN_ATTEMPTS` are told
    "wrong", and a right one is let in only if it came before those.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.failures = SigninFailures(state.client, state.keys)

    async def blocked_for(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0 when it may now."""
        failures = await self.failures.of(client)
        if failures.count < SIGNIN_ATTEMPTS:
            return 0
        return max(failures.ttl, 1)

    async def failed(self, client: str) -> int:
        """Count a wrong token from ``client``: the seconds it must now wait (0: this one
        is within the limit, so it is answered as wrong)."""
        failures = await self.failures.add(client, SIGNIN_WINDOW)
        return max(failures.ttl, 1) if failures.count > SIGNIN_ATTEMPTS else 0


async def limited(state: State, request: Request, check: Callable[[], T]) -> T:
    """``check()``, a bearer token check raising :class:`Unverified`, with a wrong token
    counted against the request's address; :class:`TooManyGuesses` (429) once the address
    is over the limit, for the right token too. No ``Authorization`` at all is no guess."""
    limit = SigninLimit(state)
    client = client_address(request)
    try:
        result = check()
    except Unverified:
        if request.headers.get("authorization") and (wait := await limit.failed(client)):
            raise TooManyGuesses(wait) from None
        raise
    if wait := await limit.blocked_for(client):
        raise TooManyGuesses(wait)
    return result
