"""The job API's requests: ``POST /api/v1/jobs`` bodies, validated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from service.hooks.payload import json_object
from worker.engine.names import repository_problem
from worker.errors import BadEvent
from worker.oci import valid_digest_or_prefix
from worker.queue.messages import JobKind, JobRequest

_JOB_KEYS: Final = frozenset({"kind", "repository", "dry_run", "digest"})


def parse_job_request(body: bytes) -> JobRequest:
    """Validate ``{"kind", "repository", "dry_run", "digest"}``; raises :class:`BadEvent`."""
    document = json_object(body)
    unknown = sorted(set(document) - _JOB_KEYS)
    if unknown:
        raise BadEvent(f"unknown fields: {', '.join(unknown)[:200]}")
    kind_value = document.get("kind")
    if kind_value not in tuple(JobKind):
        raise BadEvent(f"kind must be one of {', '.join(JobKind)}")
    request = JobRequest(
        kind=JobKind(kind_value),
        repository=_repository(document),
        dry_run=_optional_bool(document, "dry_run"),
        digest=_optional_field(document, "digest", valid_digest_or_prefix),
    )
    _check_job_shape(request)
    return request


def _repository(document: Mapping[str, Any]) -> str | None:
    """The repository, checked as ``regsweep plan REPO`` checks it (and explained alike)."""
    value = document.get("repository")
    if value is not None and not isinstance(value, str):
        raise BadEvent("repository must be a string")
    problem = None if value is None else repository_problem(value)
    if problem is not None:
        raise BadEvent(f"repository {problem}")
    return value


def _optional_field(
    document: Mapping[str, Any], key: str, check: Callable[[str], bool]
) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not check(value):
        raise BadEvent(f"{key} is not a valid {key}")
    return value


def _optional_bool(document: Mapping[str, Any], key: str) -> bool | None:
    value = document.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadEvent(f"{key} must be true or false")
    return value


def _check_job_shape(request: JobRequest) -> None:
    if request.kind is JobKind.RESTORE and (request.repository is None or request.digest is None):
        raise BadEvent("restore needs repository and digest")
    if request.kind is not JobKind.RESTORE and request.digest is not None:
        raise BadEvent("digest is only for restore")
    if request.kind is JobKind.GC and request.repository is not None:
        raise BadEvent("gc runs on the whole registry; repository is not allowed")
