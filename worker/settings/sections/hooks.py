"""The ``hooks:`` section: each sender's secret by variable name, request bounds, metrics."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Final

from worker.settings import env
from worker.settings.model import (
    DEFAULT_BODY_LIMIT,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEAD_LIMIT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_JOBS,
    DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN,
    HookSettings,
    Secret,
)
from worker.settings.validate import Section

MIN_BODY_LIMIT: Final = 1024
#: A head smaller than this cannot carry a signed webhook's headers.
MIN_HEAD_LIMIT: Final = 4096
#: Standard Webhooks signing keys: ``whsec_`` and the base64 of 24 to 64 random bytes.
SIGNING_KEY_PREFIX: Final = "whsec_"
MIN_SIGNING_KEY_BYTES: Final = 16
_HOOK_SECRET_KEYS: Final = (
    "registry_token_env",
    "github_secret_env",
    "gitlab_token_env",
    "gitlab_signing_key_env",
    "api_token_env",
    "viewer_token_env",
)
_HOOK_KEYS: Final = (
    *_HOOK_SECRET_KEYS,
    "metrics_token_env",
    "metrics_listen",
    "body_limit",
    "head_limit",
    "head_timeout",
    "body_timeout",
    "max_connections",
    "max_queued_jobs",
    "max_queued_jobs_per_token",
)


def parse_hooks(top: Section, environ: Mapping[str, str]) -> HookSettings:
    section = top.section("hooks", _HOOK_KEYS)
    unset: list[str] = []
    variables: list[tuple[str, str]] = []

    def secret(key: str) -> Secret | None:
        # An unset variable disables its hook (404): the service starts and warns,
        # check-config refuses it (HookSettings.unset).
        name = section.variable(key)
        value = None if name is None else env.secret(environ, name)
        if name is not None:
            variables.append((f"hooks.{key}", env.shown_name(name)))
        if name is not None and value is None:
            unset.append(f"hooks.{key}")
        return value

    signing_key = secret("gitlab_signing_key_env")
    if signing_key is not None and not valid_signing_key(signing_key):
        # Every signed delivery would then be refused; never echo the value.
        section.problem(
            "gitlab_signing_key_env",
            "names a variable that does not hold a Standard Webhooks key (whsec_ and base64)",
        )
        signing_key = None
    return HookSettings(
        registry_token=secret("registry_token_env"),
        github_secret=secret("github_secret_env"),
        gitlab_token=secret("gitlab_token_env"),
        gitlab_signing_key=signing_key,
        api_token=secret("api_token_env"),
        viewer_token=secret("viewer_token_env"),
        metrics_token=secret("metrics_token_env"),
        metrics_listen=_listen_address(section, "metrics_listen"),
        body_limit=section.integer("body_limit", low=MIN_BODY_LIMIT) or DEFAULT_BODY_LIMIT,
        head_limit=section.integer("head_limit", low=MIN_HEAD_LIMIT) or DEFAULT_HEAD_LIMIT,
        head_timeout=section.duration("head_timeout") or DEFAULT_HEAD_TIMEOUT,
        body_timeout=section.duration("body_timeout") or DEFAULT_BODY_TIMEOUT,
        max_connections=section.integer("max_connections", low=1) or DEFAULT_MAX_CONNECTIONS,
        max_queued_jobs=section.integer("max_queued_jobs", low=1) or DEFAULT_MAX_QUEUED_JOBS,
        max_queued_jobs_per_token=section.integer("max_queued_jobs_per_token", low=1)
        or DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN,
        unset=tuple(sorted(unset)),
        variables=tuple(variables),
    )


def _listen_address(section: Section, key: str) -> str | None:
    """``host:port`` (``[v6]:port`` for IPv6), port 1-65535."""
    value = section.text(key)
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        section.problem(key, "must be host:port, like 127.0.0.1:9100 or [::1]:9100")
        return None
    return value


def valid_signing_key(key: Secret) -> bool:
    """``whsec_<base64>`` (the prefix optional), at least 16 bytes once decoded."""
    value = key.reveal().removeprefix(SIGNING_KEY_PREFIX)
    try:
        return len(base64.b64decode(value, validate=True)) >= MIN_SIGNING_KEY_BYTES
    except binascii.Error:
        return False
