"""The read API under ``/api/v1``: what the dashboard and the CLI read, as JSON.

``GET /repositories``, ``/repositories/{name}/plan``, ``/jobs``, ``/audit``,
``/holds``, ``/dead-letters``, ``/status``, each with ``Authorization: Bearer``
and the viewer or the API token (:mod:`service.access`); ``/openapi.json``
describes them (no token: it holds no data). Handlers parse the query, call
one :class:`~service.reads.Reader` method and answer; bad input is a 400 with
a JSON reason. Loaded on the first request under ``/api/v1`` that the job
routes do not take (:mod:`service.lazy`), so the hooks never load it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from service.access import bearer_role, limited
from service.reads import (
    MAX_PER_PAGE,
    PER_PAGE,
    REPOSITORY_SORTS,
    Page,
    Reader,
    Readers,
    ServiceParts,
)
from worker.durations import parse_duration
from worker.errors import BadEvent
from worker.oci import valid_digest_or_prefix, valid_repository
from worker.store.audit import AuditQuery

#: Jobs and audit records one answer holds at most.
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 50
JOB_ID_LENGTH: Final = 32
#: A Redis stream id, as an audit page's ``next`` cursor is (each part below 2**64).
STREAM_ID: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class ReadApi:
    """The read API's handlers over one :class:`Reader` (made by the service's lifespan)."""

    def __init__(self, reader: Callable[[], Reader]) -> None:
        self._reader = reader

    async def _authorized(self, request: Request) -> Reader:
        reader = self._reader()
        authorization = request.headers.get("authorization")
        await limited(
            reader.state, request, lambda: bearer_role(reader.config.hooks, authorization)
        )
        return reader

    async def repositories(self, request: Request) -> Response:
        reader = await self._authorized(request)
        query = request.query_params
        sort = query.get("sort", "name")
        if sort.lstrip("-") not in REPOSITORY_SORTS:
            raise BadEvent(
                f"sort must be one of {', '.join(REPOSITORY_SORTS)} (- first: descending)"
            )
        page = page_of(query)
        return JSONResponse(await reader.repositories(query.get("search", "")[:200], sort, page))

    async def plan(self, request: Request) -> Response:
        reader = await self._authorized(request)
        name = request.path_params["name"]
        if not valid_repository(name):
            raise BadEvent("not a repository name")
        plan = await reader.plan(name)
        if plan is None:
            return JSONResponse({"error": f"nothing known of {name}"}, status_code=404)
        return JSONResponse(plan)

    async def jobs(self, request: Request) -> Response:
        reader = await self._authorized(request)
        query = request.query_params
        limit = bounded(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        found = await reader.jobs(limit, query.get("kind") or None, query.get("state") or None)
        return JSONResponse({"jobs": found})

    async def audit(self, request: Request) -> Response:
        reader = await self._authorized(request)
        query = request.query_params
        limit = bounded(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        return JSONResponse(await reader.audit_page(audit_query(query), limit, cursor(query)))

    async def holds(self, request: Request) -> Response:
        reader = await self._authorized(request)
        return JSONResponse({"holds": await reader.holds()})

    async def dead_letters(self, request: Request) -> Response:
        reader = await self._authorized(request)
        limit = bounded(request.query_params, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        return JSONResponse(await reader.dead_letters(limit))

    async def status(self, request: Request) -> Response:
        reader = await self._authorized(request)
        return JSONResponse(await reader.status())

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    def router(self) -> Router:
        return Router(
            routes=[
                Route("/repositories", self.repositories, methods=["GET"]),
                Route("/repositories/{name:path}/plan", self.plan, methods=["GET"]),
                Route("/jobs", self.jobs, methods=["GET"]),
                Route("/audit", self.audit, methods=["GET"]),
                Route("/holds", self.holds, methods=["GET"]),
                Route("/dead-letters", self.dead_letters, methods=["GET"]),
                Route("/status", self.status, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
            ]
        )


def create(parts: ServiceParts) -> Router:
    """The read API's routes (mounted at ``/api/v1`` by :func:`service.app.create_app`)."""
    return ReadApi(Readers(parts)).router()


# --- parsing the query -------------------------------------------------------------------


def whole_number(text: str, most: int) -> int | None:
    """``text`` as a whole number from 1 to ``most``; None for anything else. ASCII digits
    only: ``str.isdigit`` also takes ``²`` and thousands of digits, which ``int`` refuses."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(most)):
        return None
    number = int(text)
    return number if 0 < number <= most else None


def bounded(query: Mapping[str, str], key: str, default: int, most: int) -> int:
    """A positive integer parameter, at most ``most``; 400 naming it otherwise."""
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    number = whole_number(raw, most)
    if number is None:
        raise BadEvent(f"{key} must be a whole number from 1 to {most}")
    return number


def page_of(query: Mapping[str, str]) -> Page:
    return Page(
        bounded(query, "page", 1, 1_000_000), bounded(query, "per_page", PER_PAGE, MAX_PER_PAGE)
    )


def since(text: str) -> datetime:
    """A duration back from now (``24h``, ``7d``) or an ISO timestamp, as ``audit --since``;
    a time before 1970 (the audit's stream ids count from then) reads as 1970: everything."""
    try:
        return max(datetime.now(UTC) - parse_duration(text), EPOCH)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadEvent("since must be a duration like 24h or 7d, or an ISO timestamp") from exc
    return max(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC), EPOCH)


def audit_query(query: Mapping[str, str]) -> AuditQuery:
    """``since``, ``repository``, ``digest`` and ``job`` as ``regsweep audit`` takes them."""
    repository = query.get("repository") or None
    digest = query.get("digest") or None
    job = query.get("job") or None
    if repository is not None and not valid_repository(repository):
        raise BadEvent("repository is not a repository name")
    if digest is not None and not valid_digest_or_prefix(digest):
        raise BadEvent("digest must be a digest or a prefix of one")
    if job is not None and (len(job) != JOB_ID_LENGTH or not _hex(job)):
        raise BadEvent("job must be a job id (32 hex digits)")
    raw_since = query.get("since")
    return AuditQuery(
        since=since(raw_since) if raw_since else None,
        repository=repository,
        digest=digest,
        job_id=job,
    )


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def cursor(query: Mapping[str, str]) -> str | None:
    """``before``: the ``next`` of an earlier audit page (a Redis stream id), or None; 400
    for anything else (Redis would refuse it, and that is no outage)."""
    before = query.get("before") or None
    if before is not None and STREAM_ID.fullmatch(before) is None:
        raise BadEvent("before must be the next cursor of an earlier page")
    if before is not None and max(int(part) for part in before.split("-")) >= 2**64:
        raise BadEvent("before must be the next cursor of an earlier page")
    return before


# --- the OpenAPI document ----------------------------------------------------------------


def _parameter(name: str, description: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": {"type": kind}}


_PAGE = [
    _parameter("page", "1-based page", "integer"),
    _parameter(
        "per_page", f"rows per page (default {PER_PAGE}, at most {MAX_PER_PAGE})", "integer"
    ),
]
_LIMIT = _parameter("limit", f"at most this many (default {DEFAULT_LIMIT})", "integer")
_ANSWERS = {
    "400": {"description": 'a parameter that cannot be used: {"error": reason}'},
    "401": {"description": "no token, or not the viewer or API token"},
    "404": {"description": "reading is off: neither a viewer nor an API token is configured"},
    "503": {"description": "Redis does not answer"},
}


def _get(summary: str, parameters: list[dict[str, Any]], answer: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": parameters,
            "responses": {"200": {"description": answer}, **_ANSWERS},
        }
    }


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "regsweep",
        "version": "1",
        "description": "The read API the dashboard and the CLI share, and the job API.",
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/api/v1/repositories": _get(
            "Repositories: tags, manifests, bytes (shared blobs once), policy, last prune, holds",
            [
                _parameter("search", "a part of the name"),
                _parameter("sort", f"one of {', '.join(REPOSITORY_SORTS)}; - first: descending"),
                *_PAGE,
            ],
            "{page, per_page, total, pages, sort, search, repositories: [...]}",
        ),
        "/api/v1/repositories/{name}/plan": {
            "get": {
                **_get(
                    "A repository's last plan: per tag digest, push time and source, size, "
                    "verdict and reason, held, protected; per manifest children and referrers",
                    [],
                    "{repository, policy, mode, planned_at, job_id, summary, tags, manifests}",
                )["get"],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/api/v1/jobs": {
            **_get(
                "The newest jobs, each with its first deletions",
                [
                    _LIMIT,
                    _parameter("kind", "prune, sweep, gc, restore, delete, hold"),
                    _parameter("state", "queued, running, deferred, succeeded, failed, ..."),
                ],
                "{jobs: [...]}",
            ),
            "post": {
                "summary": "Enqueue a job: {kind: prune|sweep|gc|restore, repository, dry_run, "
                "digest} (the API token only)",
                "security": [{"bearer": []}],
                "responses": {"202": {"description": "{job_id, status_url}"}},
            },
        },
        "/api/v1/jobs/{job_id}": {
            "get": {
                "summary": "One job: state, plan summary, counts, bytes, errors (the API token)",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "the job record"}},
            }
        },
        "/api/v1/dead-letters/{letter_id}/replay": {
            "post": {
                "summary": "Run a dead letter's work again, or a recorded CI delivery (the API "
                "token only; a second call answers the job the first one made)",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "letter_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "a dead letter's id (or a prefix of one), or a CI "
                        "delivery's id",
                    }
                ],
                "responses": {
                    "202": {"description": "{kind, job_id, again, status_url}"},
                    "404": {"description": "nothing to replay by that id"},
                },
            }
        },
        "/api/v1/audit": _get(
            "Audited deletions, newest first, filtered as regsweep audit is",
            [
                _parameter("since", "a duration back from now (24h, 7d) or an ISO time"),
                _parameter("repository", "a repository name"),
                _parameter("digest", "a digest or a prefix of one"),
                _parameter("job", "a job id"),
                _parameter("before", "the next cursor of an earlier page"),
                _LIMIT,
            ],
            "{entries: [...], next: cursor or null}",
        ),
        "/api/v1/holds": _get(
            "The holds in force", [], "{holds: [{repository, tag, until, reason}]}"
        ),
        "/api/v1/dead-letters": _get(
            "Dead letters, newest first", [_LIMIT], "{kept, total, entries: [...]}"
        ),
        "/api/v1/status": _get(
            "Maintenance windows, the running GC, deferred prunes, dead letters, the last "
            "prune, sweep and GC (with its report), the GC history",
            [],
            "the status document",
        ),
        "/api/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}
        },
    },
}
