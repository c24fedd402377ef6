"""The dashboard at ``/ui/``: server-rendered pages over the read side, actions as jobs.

Pages (GET) read what :class:`~service.reads.Reader` reads and render a Jinja2
template (autoescaped); every change is a POST carrying the session's CSRF
token (:mod:`service.ui.session`) and becomes a job (:mod:`service.ui.actions`).
Every answer sends a strict Content-Security-Policy: scripts only from this
origin (htmx and its server-sent-events extension, pinned from npm and served
from ``node_modules``), no inline script or style. Without JavaScript every page
still works: forms post and redirect, a running job's page refreshes itself.
Loaded on the first request under ``/ui`` (:mod:`service.lazy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from service.access import API_CLIENT, Role, SigninLimit, client_address, enabled, role_for
from service.publish import EventSink
from service.read_api import audit_query, bounded, cursor, whole_number
from service.reads import Reader, Readers, ServiceParts
from service.replay import REPLAYABLE
from service.ui import actions, pages
from service.ui.forms import Form, read_form
from service.ui.session import Session, Sessions, csrf_ok, same_origin
from worker.errors import BadEvent, QueueFull, StateError
from worker.oci import valid_digest, valid_repository, valid_tag
from worker.store.audit import AuditQuery
from worker.store.intake import JobIntake

log = logging.getLogger("regsweep.service")

HERE: Final = Path(__file__).resolve().parent
#: The npm packages' files the pages load (``scripts/setup`` runs ``npm ci`` here).
VENDOR: Final = {
    "htmx.min.js": HERE / "node_modules/htmx.org/dist/htmx.min.js",
    "sse.js": HERE / "node_modules/htmx-ext-sse/dist/sse.js",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: How often a job's live page looks at the job again.
EVENTS_POLL: Final = 0.5
#: Job event streams one service process keeps open at most, the rest 503: each holds its
#: connection while its job runs (a GC: an hour), and the registry's hooks need some of
#: ``hooks.max_connections`` too, whatever a viewer's script opens.
MAX_EVENT_STREAMS: Final = 32
MAX_HOLD_DAYS: Final = 3650

Handler = Callable[[Request, Session], Awaitable[Response]]


class UiParts(ServiceParts, Protocol):
    """What the dashboard takes from the running service: the read side's parts, the sink
    jobs are handed to, and the job API's bound on queued jobs, which the admin's share."""

    sink: EventSink

    @property
    def intake(self) -> JobIntake: ...


class EventStream(StreamingResponse):
    """A job's server-sent events; ``ended`` is called however the stream ends (the job
    ended, the client went away, the service stops), even if it never started."""

    def __init__(self, events: AsyncIterator[str], ended: Callable[[], None]) -> None:
        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ended()


class Dashboard:
    """The dashboard's handlers over the service's state store and sink."""

    def __init__(self, parts: UiParts) -> None:
        self.parts = parts
        #: Job event streams open now (:data:`MAX_EVENT_STREAMS`).
        self.streams = 0
        self.readers = Readers(parts)
        self._sessions = Sessions(parts.config.hooks)
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=True, auto_reload=False
        )
        pages.install_filters(self.env)
        self.vendor = {name: path.read_bytes() for name, path in VENDOR.items() if path.exists()}
        self.env.globals["scripts"] = len(self.vendor) == len(VENDOR)
        if not self.env.globals["scripts"]:
            log.warning(
                "the dashboard's JavaScript is not installed (npm ci in service/ui): pages "
                "work without it, and a running job's page reloads itself instead"
            )

    @property
    def reader(self) -> Reader:
        return self.readers()

    @property
    def sessions(self) -> Sessions:
        """The cookie's signer for the tokens configured now: an edited policy file that
        changes or removes a token signs everyone out at once, not at the next restart."""
        hooks = self.parts.config.hooks
        if self._sessions.hooks is not hooks:
            self._sessions = Sessions(hooks)
        return self._sessions

    # --- answering -------------------------------------------------------------------

    def render(
        self, request: Request, session: Session, template: str, code: int = 200, **context: Any
    ) -> Response:
        html = self.env.get_template(template).render(
            session=session,
            path=request.url.path,
            read_only=self.parts.config.hooks.api_token is None,
            **context,
        )
        response = HTMLResponse(html, status_code=code, headers=SECURITY_HEADERS)
        self.sessions.save(request, response, session)
        return response

    def redirect(self, request: Request, session: Session, to: str) -> Response:
        response = RedirectResponse(to, status_code=303, headers=SECURITY_HEADERS)
        self.sessions.save(request, response, session)
        return response

    def error(self, request: Request, session: Session, status: int, message: str) -> Response:
        return self.render(request, session, "error.html", status, message=message)

    # --- sign-in ---------------------------------------------------------------------

    async def signin_page(self, request: Request) -> Response:
        if not enabled(self.parts.config.hooks):
            return _off()
        session = self.sessions.load(request)
        return self.render(request, session, "signin.html", next=_next(request))

    async def signin(self, request: Request) -> Response:
        hooks = self.parts.config.hooks
        if not enabled(hooks):
            return _off()
        session = self.sessions.load(request)
        form = await read_form(request)
        if not same_origin(request) or not csrf_ok(session, form.get("csrf")):
            return self.error(request, session, 403, "the form expired: reload the page")
        limit, client = SigninLimit(self.parts.state), client_address(request)
        role = role_for(hooks, str(form.get("token") or ""))
        # A wrong token is counted before it is answered, so a burst cannot outrun the count.
        wait = await (limit.failed(client) if role is None else limit.blocked_for(client))
        if wait:
            response = self.render(
                request, session, "signin.html", 429, next=_next(request), wait=wait
            )
            response.headers["Retry-After"] = str(wait)
            return response
        if role is None:
            return self.render(
                request, session, "signin.html", 401, next=_next(request), failed=True
            )
        return self.redirect(request, session.signed_in(role), _next(request))

    async def signout(self, request: Request) -> Response:
        session = self.sessions.load(request)
        form = await read_form(request)
        if not same_origin(request) or not csrf_ok(session, form.get("csrf")):
            return self.error(request, session, 403, "the form expired: reload the page")
        return self.redirect(request, Session.anonymous(), "/ui/signin")

    # --- pages -----------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        reader = self.reader
        status, totals, failed = await asyncio.gather(
            reader.status(), reader.totals(), reader.jobs(20, state="failed")
        )
        return self.render(
            request,
            session,
            "overview.html",
            status=status,
            totals=totals,
            alerts=pages.alerts(status, failed),
        )

    async def repositories(self, request: Request, session: Session) -> Response:
        query = request.query_params
        sort = query.get("sort", "name")
        if sort.lstrip("-") not in pages.REPOSITORY_SORTS:
            sort = "name"
        listing = await self.reader.repositories(
            query.get("q", "")[:200], sort, pages.page_of(query, pages.REPOSITORIES_PER_PAGE)
        )
        return self.render(request, session, "repositories.html", listing=listing)

    async def repository(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]
        if not valid_repository(name):
            return self.error(request, session, 400, "not a repository name")
        plan = await self.reader.plan(name)
        if plan is None:
            return self.error(request, session, 404, f"nothing is known of {name} yet")
        table = pages.tag_table(plan, request.query_params)
        return self.render(request, session, "repository.html", plan=plan, table=table)

    async def tag(self, request: Request, session: Session) -> Response:
        name, tag = request.query_params.get("repository", ""), request.query_params.get("tag", "")
        if not valid_repository(name) or not valid_tag(tag):
            return self.error(request, session, 400, "not a repository and tag")
        plan = await self.reader.plan(name)
        detail = pages.tag_detail(plan, tag) if plan else None
        if plan is None or detail is None:
            return self.error(request, session, 404, f"{name}:{tag} is not known")
        done = await self._recorded(request.query_params.get("job", ""), name, tag)
        return self.render(request, session, "tag.html", plan=plan, detail=detail, done=done)

    async def _recorded(self, job_id: str, repository: str, tag: str) -> dict[str, Any] | None:
        """The hold or unhold job a tag page was sent to after (``?job=``), when it is one."""
        job = await self.reader.job(job_id) if _job_id(job_id) else None
        if job is None or job.get("kind") not in (actions.HOLD_KIND, actions.UNHOLD_KIND):
            return None
        params = job.get("params") or {}
        mine = params.get("repository") == repository and params.get("tag") == tag
        return job if mine else None

    async def jobs(self, request: Request, session: Session) -> Response:
        query = request.query_params
        kind, state = query.get("kind") or None, query.get("state") or None
        found = await self.reader.jobs(100, kind, state)
        return self.render(request, session, "jobs.html", jobs=found, kind=kind, state=state)

    async def job(self, request: Request, session: Session) -> Response:
        found = await self._job(request)
        if found is None:
            return self.error(request, session, 404, "no such job (records live 7 days)")
        return self.render(request, session, "job.html", job=found, **pages.job_context(found))

    async def _job(self, request: Request) -> dict[str, Any] | None:
        job_id = request.path_params["job_id"]
        return await self.reader.job(job_id) if _job_id(job_id) else None

    async def job_events(self, request: Request, session: Session) -> Response:
        """Server-sent events: the job's progress fragment each time it changes, then
        ``done`` (the page's ``sse-close``) once the job ended."""
        first = await self._job(request)
        if first is None:
            return self.error(request, session, 404, "no such job")
        if self.streams >= MAX_EVENT_STREAMS:
            busy = self.error(request, session, 503, "too many pages follow jobs live; reload")
            busy.headers["Retry-After"] = "10"
            return busy
        self.streams += 1
        return EventStream(self._events(request, session, str(first["id"])), self._stream_ended)

    def _stream_ended(self) -> None:
        self.streams -= 1

    async def _events(self, request: Request, session: Session, job_id: str) -> AsyncIterator[str]:
        shown = None
        template = self.env.get_template("_job.html")
        while not await request.is_disconnected():
            job = await self.reader.job(job_id)
            if job is None:
                return
            context = pages.job_context(job)
            # A settled deletion changes neither the record nor the audit's length: count it.
            mark = (job.get("updated"), len(job["deletions"]), context["settled"])
            if mark != shown:
                shown = mark
                html = template.render(session=session, job=job, **context)
                yield _sse("job", html)
            if context["final"]:
                yield _sse("done", "")
                return
            await asyncio.sleep(EVENTS_POLL)

    async def audit(self, request: Request, session: Session) -> Response:
        query = request.query_params
        filters = {k: query.get(k, "") for k in ("since", "repository", "digest", "job")}
        limit = bounded(query, "limit", 100, 1000)
        page = await self.reader.audit_page(audit_query(query), limit, cursor(query))
        more = (
            "?" + urlencode({**{k: v for k, v in filters.items() if v}, "before": page["next"]})
            if page["next"]
            else None
        )
        return self.render(request, session, "audit.html", page=page, filters=filters, more=more)

    async def restore_page(self, request: Request, session: Session) -> Response:
        name, digest = (
            request.query_params.get("repository", ""),
            request.query_params.get("digest", ""),
        )
        if not valid_repository(name) or not valid_digest(digest):
            return self.error(request, session, 400, "not a repository and digest")
        entries = await self.reader.audit.entries(AuditQuery(repository=name, digest=digest))
        return self.render(
            request, session, "restore.html", repository=name, digest=digest, entries=entries
        )

    async def maintenance(self, request: Request, session: Session) -> Response:
        status = await self.reader.status()
        gc_jobs = await self.reader.jobs(20, kind="gc")
        return self.render(
            request,
            session,
            "maintenance.html",
            status=status,
            gc_jobs=gc_jobs,
            chart=pages.gc_chart(status["gc_history"]),
        )

    async def dead_letters(self, request: Request, session: Session) -> Response:
        letters = await self.reader.dead_letters(200)
        return self.render(
            request, session, "dead_letters.html", letters=letters, replayable=REPLAYABLE
        )

    # --- actions (admin, POST, CSRF) -------------------------------------------------

    async def preview(self, request: Request, session: Session, form: Form) -> Response:
        fields = _checked(form)
        kind, params = actions.preview_params(str(form.get("action", "")), fields, _by(session))
        if kind == "gc" and self.parts.config.maintenance.controller is None:
            raise BadEvent("GC needs maintenance.controller in the policy file")
        repository = params.get("repository")
        if repository is not None and self.parts.config.policy_for(repository) is None:
            raise BadEvent(f"no policy governs {repository}: regsweep never deletes from it")
        job_id = await self._admitted(kind, params)
        return self.redirect(request, session, f"/ui/jobs/{job_id}")

    async def _admitted(self, kind: str, params: Mapping[str, Any]) -> str:
        """A new job, counted against the API token's bound on queued jobs (the admin signed
        in with it): a form resent in a loop is refused as a flood of API requests is. The
        run of a preview is not counted again: each preview runs once."""
        intake = self.parts.intake
        job_id = await intake.admit(API_CLIENT)
        try:
            return await actions.enqueue(self.parts.state, self.parts.sink, kind, params, job_id)
        except BaseException:
            with contextlib.suppress(StateError):
                await intake.release(API_CLIENT, job_id)
            raise

    async def run(self, request: Request, session: Session, form: Form) -> Response:
        preview_id = str(form.get("preview", ""))
        preview = await self.parts.state.get_job(preview_id) if len(preview_id) == 32 else None
        if preview is None:
            raise BadEvent("no such preview (records live 7 days)")
        job_id = await actions.run_once(self.parts.state, self.parts.sink, preview, _by(session))
        return self.redirect(request, session, f"/ui/jobs/{job_id}")

    async def hold(self, request: Request, session: Session, form: Form) -> Response:
        fields = _checked(form, "repository", "tag")
        days = whole_number(str(form.get("days", "") or actions.DEFAULT_HOLD.days), MAX_HOLD_DAYS)
        if days is None:
            raise BadEvent(f"days must be a whole number from 1 to {MAX_HOLD_DAYS}")
        index = self.reader.index
        repository, tag = fields["repository"], fields["tag"]
        if self.parts.config.policy_for(repository) is None:
            raise BadEvent(
                f"no policy governs {repository}: nothing deletes its tags, so nothing was held"
            )
        by = _by(session)
        job_id = await actions.hold(self.parts.state, index, repository, tag, days=days, by=by)
        return self.redirect(request, session, _tag_url(fields, job_id))

    async def unhold(self, request: Request, session: Session, form: Form) -> Response:
        fields = _checked(form, "repository", "tag")
        job_id = await actions.unhold(
            self.parts.state, self.reader.index, fields["repository"], fields["tag"], _by(session)
        )
        return self.redirect(request, session, _tag_url(fields, job_id))

    async def restore(self, request: Request, session: Session, form: Form) -> Response:
        fields = _checked(form, "repository", "digest")
        params = {
            "repository": fields["repository"],
            "digest": fields["digest"],
            "by": _by(session),
        }
        job_id = await self._admitted("restore", params)
        return self.redirect(request, session, f"/ui/jobs/{job_id}")

    async def replay(self, request: Request, session: Session, form: Form) -> Response:
        done = await actions.replay_dead_letter(
            self.parts.state, self.parts.sink, str(form.get("letter", ""))
        )
        return self.redirect(
            request, session, f"/ui/jobs/{done.job_id}" if done.job_id else "/ui/jobs"
        )

    # --- static files ----------------------------------------------------------------

    async def stylesheet(self, request: Request) -> Response:
        css = (HERE / "static/app.css").read_bytes()
        return Response(css, media_type="text/css", headers=_static_headers())

    async def vendor_file(self, request: Request) -> Response:
        body = self.vendor.get(request.path_params["name"])
        if body is None:
            return Response("not installed", status_code=404, headers=SECURITY_HEADERS)
        return Response(body, media_type="text/javascript", headers=_static_headers())


# --- guards ------------------------------------------------------------------------------


def page(dashboard: Dashboard, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A GET page: signed in (else to the sign-in form), errors as pages."""

    @wraps(handler)
    async def guarded(request: Request) -> Response:
        if not enabled(dashboard.parts.config.hooks):
            return _off()
        session = dashboard.sessions.load(request)
        if session.role is None:
            target = urlencode(
                {"next": request.url.path + ("?" + request.url.query if request.url.query else "")}
            )
            return dashboard.redirect(request, session, f"/ui/signin?{target}")
        try:
            return await handler(request, session)
        except BadEvent as exc:
            return dashboard.error(request, session, 400, str(exc))
        except StateError as exc:
            log.error("%s %s: %s", request.method, request.url.path, exc)
            return dashboard.error(request, session, 503, "Redis does not answer; try again")

    return guarded


Action = Callable[[Request, Session, Form], Awaitable[Response]]


def action(dashboard: Dashboard, handler: Action) -> Callable[[Request], Awaitable[Response]]:
    """A POST that changes something: the admin only, same origin, the session's CSRF token."""

    @wraps(handler)
    async def guarded(request: Request) -> Response:
        if not enabled(dashboard.parts.config.hooks):
            return _off()
        session = dashboard.sessions.load(request)
        form = await read_form(request)
        if not same_origin(request) or not csrf_ok(session, form.get("csrf")):
            return dashboard.error(
                request, session, 403, "refused: the form's CSRF token is missing or stale"
            )
        if session.role is not Role.ADMIN:
            return dashboard.error(
                request, session, 403, "only an admin (the API token) may change things"
            )
        try:
            return await handler(request, session, form)
        except BadEvent as exc:
            return dashboard.error(request, session, 400, str(exc))
        except QueueFull as exc:
            refused = dashboard.error(request, session, 429, str(exc))
            refused.headers["Retry-After"] = str(exc.retry_after)
            return refused
        except StateError as exc:
            log.error("%s %s: %s", request.method, request.url.path, exc)
            return dashboard.error(request, session, 503, "Redis does not answer; nothing was done")

    return guarded


def _checked(form: Form, *required: str) -> dict[str, str]:
    """The form's repository, tag and digest, each valid when present, the ``required`` ones
    present; BadEvent naming the field otherwise."""
    out: dict[str, str] = {}
    checks = {"repository": valid_repository, "tag": valid_tag, "digest": valid_digest}
    for key, check in checks.items():
        value = form.get(key)
        if value in (None, ""):
            if key in required:
                raise BadEvent(f"the form has no {key}")
            continue
        if not isinstance(value, str) or not check(value):
            raise BadEvent(f"{key} is not a valid {key}")
        out[key] = value
    return out


def _job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _by(session: Session) -> str:
    return str(session.role) if session.role else "nobody"


def _tag_url(fields: Mapping[str, str], job_id: str | None = None) -> str:
    """A tag's page; after a hold or unhold, with the job that recorded it (shown there)."""
    query = {"repository": fields["repository"], "tag": fields.get("tag", "")}
    if job_id is not None:
        query["job"] = job_id
    return "/ui/tag?" + urlencode(query)


def _next(request: Request) -> str:
    """Where to go after signing in: a path of this dashboard only (no open redirect)."""
    target = request.query_params.get("next", "/ui/")
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/"


def _sse(event: str, data: str) -> str:
    lines = "\n".join(f"data: {line}" for line in (data.splitlines() or [""]))
    return f"event: {event}\n{lines}\n\n"


def _off() -> Response:
    body = json.dumps({"error": "dashboard disabled: set hooks.viewer_token_env or api_token_env"})
    return Response(body, status_code=404, media_type="application/json", headers=SECURITY_HEADERS)


def _static_headers() -> dict[str, str]:
    return {**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"}


def create(parts: UiParts) -> Router:
    """The dashboard's routes (mounted at ``/ui`` by :func:`service.app.create_app`)."""
    d = Dashboard(parts)
    pages_ = {
        "/": d.overview,
        "/repositories": d.repositories,
        "/r/{name:path}": d.repository,
        "/tag": d.tag,
        "/jobs": d.jobs,
        "/jobs/{job_id}": d.job,
        "/jobs/{job_id}/events": d.job_events,
        "/audit": d.audit,
        "/restore": d.restore_page,
        "/maintenance": d.maintenance,
        "/dead-letters": d.dead_letters,
    }
    posts = {
        "/actions/preview": d.preview,
        "/actions/run": d.run,
        "/actions/hold": d.hold,
        "/actions/unhold": d.unhold,
        "/actions/restore": d.restore,
        "/dead-letters/replay": d.replay,
    }
    routes = [
        Route("/signin", d.signin_page, methods=["GET"]),
        Route("/signin", d.signin, methods=["POST"]),
        Route("/signout", d.signout, methods=["POST"]),
        Route("/static/app.css", d.stylesheet, methods=["GET"]),
        Route("/static/vendor/{name}", d.vendor_file, methods=["GET"]),
        *(Route(path, page(d, handler), methods=["GET"]) for path, handler in pages_.items()),
        *(Route(path, action(d, handler), methods=["POST"]) for path, handler in posts.items()),
    ]
    return Router(routes=routes)
