"""Who may read and who may change: the viewer token reads, the API token is the admin.

The read API (``GET /api/v1/...``) takes either token as ``Authorization: Bearer``;
the dashboard signs in with either (:mod:`service.ui.session`). Both tokens are
compared in constant time, always both, so the answer's timing does not tell
which one a guess came close to. With neither token configured the read API and
the dashboard are off (404), as an unconfigured hook is; with only the viewer
token the deployment is read-only: no admin exists, so nothing can be changed.
"""

from __future__ import annotations

from enum import StrEnum

from starlette.exceptions import HTTPException

from service.hooks.verify import same
from worker.errors import Unverified
from worker.settings.model import HookSettings


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
