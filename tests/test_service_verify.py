"""Signature and token checks: GitHub HMAC, Standard Webhooks, bearer and shared tokens."""

from __future__ import annotations

import base64
import time

import pytest

from service.hooks.github import check_github_signature, github_signature
from service.hooks.verify import check_bearer, check_standard_webhook, check_token
from tests.harness.service import standard_webhook_headers
from worker.errors import Unverified
from worker.settings.model import Secret

GITHUB_VECTOR_SECRET = Secret("It's a Secret to Everybody")
GITHUB_VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
SIGNING_KEY = "whsec_" + base64.b64encode(b"regsweep-test-signing-key-32byte").decode()


def test_github_published_test_vector() -> None:
    """Our HMAC matches GitHub's published example, and the check accepts it."""
    assert github_signature(GITHUB_VECTOR_SECRET, b"Hello, World!") == GITHUB_VECTOR_SIGNATURE
    check_github_signature(GITHUB_VECTOR_SECRET, b"Hello, World!", GITHUB_VECTOR_SIGNATURE)


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"Hello, World!", None, "missing"),
        (b"Hello, World!!", GITHUB_VECTOR_SIGNATURE, "does not match"),
        (b"Hello, World!", "sha1=757107ea0eb2509fc211221cce984b8a37570b6d", "does not match"),
        (b"Hello, World!", "sha256=\u00e9", "does not match"),
    ],
    ids=["missing", "other-body", "sha1", "non-ascii"],
)
def test_github_signature_refusals(body: bytes, header: str | None, message: str) -> None:
    """A missing, mismatching or non-ASCII signature raises Unverified, never TypeError."""
    with pytest.raises(Unverified, match=message):
        check_github_signature(GITHUB_VECTOR_SECRET, body, header)


def test_bearer_and_shared_token() -> None:
    """Bearer accepts any scheme case and refuses wrong schemes, tokens and absences."""
    secret = Secret("s3cret")
    check_bearer(secret, "Bearer s3cret")
    check_bearer(secret, "bearer s3cret")
    for header in (None, "", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2", "Bearer \u00fc"):
        with pytest.raises(Unverified) as info:
            check_bearer(secret, header)
        assert "s3cret" not in str(info.value)
    check_token(secret, "s3cret", "X-Gitlab-Token")
    with pytest.raises(Unverified, match="invalid X-Gitlab-Token"):
        check_token(secret, "nope", "X-Gitlab-Token")


def test_standard_webhook_signature_accepts_any_listed() -> None:
    """A valid v1 signature is accepted even when listed after others (key rotation)."""
    body = b'{"object_kind": "push"}'
    headers = standard_webhook_headers(SIGNING_KEY, body, "msg_1")
    signatures = "v1,AAAA v1a,xyz " + headers["webhook-signature"]
    check_standard_webhook(
        Secret(SIGNING_KEY),
        body,
        msg_id="msg_1",
        timestamp=headers["webhook-timestamp"],
        signatures=signatures,
    )


@pytest.mark.parametrize(
    ("skew", "msg_id", "tamper", "message"),
    [
        (-301, "msg_1", False, "5 minutes"),
        (301, "msg_1", False, "5 minutes"),
        (0, "msg_2", False, "does not match"),
        (0, "msg_1", True, "does not match"),
    ],
    ids=["old", "future", "other-id", "other-body"],
)
def test_standard_webhook_refusals(skew: int, msg_id: str, tamper: bool, message: str) -> None:
    """Timestamps over 5 minutes away, another id or another body are refused."""
    now = time.time()
    body = b'{"object_kind": "push"}'
    headers = standard_webhook_headers(SIGNING_KEY, body, "msg_1", at=now + skew)
    with pytest.raises(Unverified, match=message):
        check_standard_webhook(
            Secret(SIGNING_KEY),
            body + b" " if tamper else body,
            msg_id=msg_id,
            timestamp=headers["webhook-timestamp"],
            signatures=headers["webhook-signature"],
            now=now,
        )
