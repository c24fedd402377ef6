"""Checks that a delivery comes from who it says: tokens, HMAC signatures.

Every comparison is constant-time (``hmac.compare_digest`` over bytes: the
``str`` form raises for non-ASCII input, which an attacker controls). The
messages of :class:`Unverified` go into 401 responses, so they never contain
a secret or the value that was sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Final

from starlette.exceptions import HTTPException

from worker.errors import Unverified
from worker.settings.model import Secret
from worker.settings.sections.hooks import SIGNING_KEY_PREFIX

#: Standard Webhooks: a delivery older or newer than this is refused (replay window).
TIMESTAMP_TOLERANCE: Final = 5 * 60
#: Unix seconds have 10 digits until the year 2286.
TIMESTAMP_DIGITS: Final = 12


def same(expected: str | bytes, given: str | bytes) -> bool:
    left = expected.encode() if isinstance(expected, str) else expected
    right = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(left, right)


def check_bearer(secret: Secret, authorization: str | None) -> None:
    """``Authorization: Bearer <token>`` must carry ``secret``."""
    if not authorization:
        raise Unverified("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not same(secret.reveal(), token.strip()):
        raise Unverified("invalid bearer token")


def check_token(secret: Secret, given: str | None, header: str) -> None:
    """A shared-secret header such as ``X-Gitlab-Token`` must equal ``secret``."""
    if not given:
        raise Unverified(f"missing {header} header")
    if not same(secret.reveal(), given):
        raise Unverified(f"invalid {header}")


def signing_key_bytes(key: Secret) -> bytes:
    """The raw key of a Standard Webhooks secret (``whsec_<base64>``)."""
    value = key.reveal().removeprefix(SIGNING_KEY_PREFIX)
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        # Config validation should have caught this; never echo the value.
        raise Unverified("the configured signing key is not base64") from exc


def standard_webhook_signature(key: Secret, msg_id: str, timestamp: str, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(signing_key_bytes(key), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_standard_webhook(
    key: Secret,
    body: bytes,
    *,
    msg_id: str | None,
    timestamp: str | None,
    signatures: str | None,
    now: float | None = None,
) -> None:
    """Check ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` (any one of several)."""
    if not msg_id or not timestamp or not signatures:
        raise Unverified("missing webhook-id, webhook-timestamp or webhook-signature header")
    # Digits only, and few: int() also takes blanks, signs and "_", and a number of
    # hundreds of digits overflows the float it is compared with.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > TIMESTAMP_DIGITS:
        raise Unverified("webhook-timestamp is not a time in seconds")
    sent = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - sent) > TIMESTAMP_TOLERANCE:
        raise Unverified("webhook-timestamp is more than 5 minutes away from now")
    expected = standard_webhook_signature(key, msg_id, timestamp, body)
    # Compare every candidate, not just until the first match, so timing
    # does not tell which position matched.
    matches = [same(expected, candidate) for candidate in signatures.split()]
    if not any(matches):
        raise Unverified("webhook-signature does not match")


#: Delivery ids are UUIDs (GitHub, GitLab) or ``msg_...`` (Standard Webhooks).
MAX_DELIVERY_ID: Final = 128


def checked_delivery_id(name: str, value: str) -> str:
    if len(value) > MAX_DELIVERY_ID or not value.isascii() or not value.isprintable():
        raise HTTPException(400, f"{name} is not an id of up to {MAX_DELIVERY_ID} characters")
    return value
