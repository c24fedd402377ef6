"""The HTTP edge: receives, verifies, normalises and hands on. No registry calls here.

Handlers parse, call one function of :mod:`service.ingest`, and leave error
mapping to the exception handlers below: :class:`~worker.errors.Unverified`
→ 401, :class:`~worker.errors.BadEvent` → 400, ``HTTPException`` → its status,
:class:`~worker.errors.QueueFull` → 429 with ``Retry-After``,
:class:`~worker.errors.StateError` → 503, a client that went away before its
body arrived → nothing sent (counted as 499), anything else → 500; always
``{"error": ...}``, never a traceback. Connection-level bounds (head size and
time, body time, connections) are :mod:`service.protocol`'s, before the app.

The policy file is looked at between requests (:class:`PolicyLook`): a change
that loads is taken at once (policies, hook secrets, limits of the job API);
while a change does not load, CI events are queued unfiltered (the workers,
which hold their tasks until the file loads, decide) and a job whose
repository only the policy could vouch for gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.access import API_CLIENT, limited
from service.api import parse_job_request
from service.health import Health, registry_client
from service.hooks import sources, verify
from service.hooks.registry import read_registry_delivery
from service.hooks.source import HookSource, media_type, require_json
from service.ingest import OUTCOME_HEADER, RegistryIngest, RegistryOutcome, ingest_ci, submit_job
from service.lazy import LazyApp
from service.limits import read_body
from service.metrics import RequestLatency, Scrapes, ServiceMetrics
from service.protocol import RequestLimits, bounded_protocol
from service.publish import CelerySink, EventSink
from service.replay import REPLAY_ID, replay
from worker import logs
from worker.engine.events import CiEvent
from worker.errors import BadEvent, ConfigError, NothingToReplay, QueueFull, StateError, Unverified
from worker.queue.messages import JobKind, JobRequest
from worker.settings.model import Config, HookSettings
from worker.settings.watch import PolicyChanging, PolicyWatch, StalePolicy
from worker.store.intake import JobIntake
from worker.store.metrics import WorkerMetricsSnapshot
from worker.store.processes import REPORT_EVERY, ProcessReport, report_async, withdraw_async
from worker.store.redis import async_client
from worker.store.state import State

__all__ = ["CelerySink", "EventSink", "create_app", "serve"]

log = logging.getLogger("regsweep.service")

HOOK_SOURCES: Final = {
    "/hooks/registry": "registry",
    **{f"/hooks/{source.name}": source.name for source in sources.SOURCES},
}
JOB_ID: Final = re.compile(r"[0-9a-f]{32}")
#: Configured but unset, this key turns /metrics off (404), as an unset hook secret does.
METRICS_TOKEN_KEY: Final = "hooks.metrics_token_env"
#: The status a request whose client went away is counted under (nginx's 499); never sent.
CLIENT_CLOSED_REQUEST: Final = 499
#: The service looks at the policy file at most this often (between requests).
LOOK_EVERY: Final = 0.5


@functools.lru_cache(maxsize=64)
def _registry_answer(outcome: RegistryOutcome) -> Response:
    """The 202 for ``outcome``, made once: a Response is only read when sent, and a
    handful of outcomes cover nearly every delivery."""
    return Response(status_code=202, headers={OUTCOME_HEADER: outcome.header()})


def _disabled() -> Response:
    return JSONResponse({"error": "hook disabled"}, status_code=404)


class Endpoints:
    """The route handlers, bound to the config, the sink and (after start-up) the state."""

    def __init__(
        self, config: Config, sink: EventSink, metrics: ServiceMetrics, state: State | None
    ) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        #: Renewed by the lifespan with the workers' metrics when Redis is configured.
        self.scrapes = Scrapes(metrics, None)
        #: Set by the lifespan when the app makes its own Redis client.
        self.state_store = state
        self._registry_ingest: RegistryIngest | None = None
        #: Made by the lifespan (it needs the state store and a registry client).
        self.health: Health | None = None
        #: The policy file this service runs, when it was loaded from one.
        self.watch = _watch(config)
        #: Why the policy file as it is now cannot be run (None while it can).
        self.stale: str | None = None
        self._looked = float("-inf")
        #: Set when the policy this service runs changes: reported at once.
        self.changed = asyncio.Event()
        self._intake: JobIntake | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())

    def look(self) -> None:
        """Take a changed policy file (between requests); at most every :data:`LOOK_EVERY`."""
        now = time.monotonic()
        if self.watch is None or now - self._looked < LOOK_EVERY:
            return
        self._looked = now
        before = (self.watch.digest, self.stale)
        try:
            new = self.watch.check()
            self.stale = None
        except PolicyChanging:
            return  # being written: the current one serves until it settles
        except StalePolicy as exc:
            new, self.stale = None, str(exc)
        if new is not None:
            self.config = new
            self._intake = None  # its bounds may have changed
            _log_hooks(new.hooks)
        if (self.watch.digest, self.stale) != before:
            self.changed.set()

    @property
    def intake(self) -> JobIntake:
        """The job API's bounds, over this state store (made again for a reloaded policy)."""
        state = self.state
        if self._intake is None or self._intake.state is not state:
            hooks = self.config.hooks
            self._intake = JobIntake(
                state, total=hooks.max_queued_jobs, per_client=hooks.max_queued_jobs_per_token
            )
        return self._intake

    async def report(self, *, withdraw: bool = False) -> None:
        """This service's report in Redis (``regsweep status``): the policy it runs; taken
        away with ``withdraw`` (the service stops)."""
        if self.watch is None or self.state_store is None:
            return
        process = ProcessReport.of("service", self.watch, self.started)
        client, keys = self.state_store.client, self.state_store.keys
        try:
            if withdraw:
                await withdraw_async(client, keys, process.id)
            else:
                await report_async(client, keys, process)
        except StateError as exc:
            log.warning("%s not reported: %s", process.id, exc)

    @property
    def state(self) -> State:
        if self.state_store is None:
            raise StateError("the service has not started: no Redis client")
        return self.state_store

    @property
    def registry_ingest(self) -> RegistryIngest:
        """One group committer per state store, made when the first delivery needs it."""
        state = self.state
        if self._registry_ingest is None or self._registry_ingest.state is not state:
            self._registry_ingest = RegistryIngest(state, self.sink)
        return self._registry_ingest

    async def registry(self, request: Request) -> Response:
        secret = self.config.hooks.registry_token
        if secret is None:
            return _disabled()
        body = await read_body(request, self.config.hooks.body_limit)
        verify.check_bearer(secret, request.headers.get("authorization"))
        envelope = read_registry_delivery(media_type(request), body)
        outcome = await self.registry_ingest.ingest(envelope, body)
        self.metrics.count_many("registry", outcome.metric_counts())
        return _registry_answer(outcome)

    def ci_hook(self, source: HookSource) -> Callable[[Request], Awaitable[Response]]:
        """The handler of ``/hooks/<source>``: every CI source's deliveries take these steps."""

        async def hook(request: Request) -> Response:
            hooks = self.config.hooks
            if not source.enabled(hooks):
                return _disabled()
            body = await read_body(request, hooks.body_limit)
            source.verify(hooks, request, body)
            delivery_id = source.delivery_id(hooks, request)
            parsed = source.parse(request, body, delivery_id)
            if parsed.answer is not None:
                return JSONResponse(parsed.answer)
            dedup = source.dedup_keys(self.state.keys, delivery_id, body)
            return await self._ci(parsed.event, source.name, parsed.what, dedup)

        return hook

    async def _ci(
        self, event: CiEvent | None, source: str, what: str, dedup: list[str]
    ) -> Response:
        if event is None:
            self.metrics.count(source, "ignored")
            reason = f"{what} does not delete images"
            return JSONResponse({"status": "ignored", "reason": reason}, status_code=202)
        # While the policy file does not load, nobody here can tell: the workers decide.
        unwanted = sources.unwanted(self.config.policies, event) if self.stale is None else None
        if unwanted is not None:
            self.metrics.count(source, "ignored")
            log.info("%s delivery %s ignored: %s", source, event.delivery_id, unwanted)
            return JSONResponse({"status": "ignored", "reason": unwanted}, status_code=202)
        if not await ingest_ci(event, self.state, self.sink, dedup):
            self.metrics.count(source, "duplicate")
            return JSONResponse({"status": "duplicate", "delivery": event.delivery_id})
        self.metrics.count(source, "accepted")
        return JSONResponse({"status": "accepted", "delivery": event.delivery_id}, 202)

    async def create_job(self, request: Request) -> Response:
        await self._check_api_token(request)
        body = await read_body(request, self.config.hooks.body_limit)
        require_json(request, "Job requests")
        job = parse_job_request(body)
        self._check_governed(job)
        job_id = await self.intake.admit(API_CLIENT)
        try:
            await submit_job(job, self.state, self.sink, job_id=job_id)
        except BaseException:
            with contextlib.suppress(StateError):
                await self.intake.release(API_CLIENT, job_id)
            raise
        self.metrics.jobs.labels(job.kind.value, "queued").inc()
        status_url = f"/api/v1/jobs/{job_id}"
        return JSONResponse({"job_id": job_id, "status_url": status_url}, status_code=202)

    async def get_job(self, request: Request) -> Response:
        await self._check_api_token(request)
        job_id = request.path_params["job_id"]
        job = await self.state.get_job(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            return JSONResponse({"error": "unknown job"}, status_code=404)
        return JSONResponse(job)

    async def replay(self, request: Request) -> Response:
        await self._check_api_token(request)
        given = request.path_params["letter_id"]
        if not REPLAY_ID.fullmatch(given):
            raise BadEvent("not a dead letter or delivery id")
        try:
            done = await replay(given, self.state, self.sink)
        except NothingToReplay as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        answer = done.as_dict()
        if done.job_id is not None:
            answer["status_url"] = f"/api/v1/jobs/{done.job_id}"
        return JSONResponse(answer, status_code=202)

    def _check_governed(self, job: JobRequest) -> None:
        """A prune or sweep of a repository no policy governs would do nothing: refused, as
        ``regsweep prune NAME`` refuses it (restores are of what the audit holds)."""
        if job.kind not in (JobKind.PRUNE, JobKind.SWEEP) or job.repository is None:
            return
        if self.stale is not None:
            raise HTTPException(
                503,
                "the policy file changed and does not load, so which policy governs "
                f"{job.repository} is not known; retry once it is fixed (regsweep check-config)",
            )
        if self.config.policy_for(job.repository) is None:
            raise HTTPException(
                422,
                f"no policy governs {job.repository}: regsweep never prunes it "
                "(no policy's repositories match it)",
            )

    async def _check_api_token(self, request: Request) -> None:
        """The API token, or 401; wrong ones count with the dashboard's failed sign-ins (it
        is the admin's token), 429 past the limit."""
        token = self.config.hooks.api_token
        if token is None:
            raise HTTPException(404, "job API disabled")
        authorization = request.headers.get("authorization")
        await limited(self.state, request, lambda: verify.check_bearer(token, authorization))

    async def healthz(self, request: Request) -> Response:
        # Liveness: 200 while the process serves; the details say what it can reach.
        if self.health is None:
            return JSONResponse({"ok": True})
        return JSONResponse(await self.health.document())

    async def readyz(self, request: Request) -> Response:
        try:
            await self.state.ping()
        except StateError as exc:
            log.warning("not ready: %s", exc)
            return JSONResponse({"error": "redis unreachable"}, status_code=503)
        return JSONResponse({"ok": True})

    async def metrics_text(self, request: Request) -> Response:
        hooks = self.config.hooks
        if METRICS_TOKEN_KEY in hooks.unset:
            raise HTTPException(404, "metrics disabled: hooks.metrics_token_env is not set")
        if hooks.metrics_token is not None:
            verify.check_bearer(hooks.metrics_token, request.headers.get("authorization"))
        payload = await self.scrapes.payload()
        return Response(payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _routes(endpoints: Endpoints) -> list[BaseRoute]:
    """The hooks first (the routes are tried in order), the read API and the dashboard last,
    each loaded by its first request (:mod:`service.lazy`)."""
    return [
        Route("/hooks/registry", endpoints.registry, methods=["POST"]),
        *(
            Route(f"/hooks/{source.name}", endpoints.ci_hook(source), methods=["POST"])
            for source in sources.SOURCES
        ),
        Route("/api/v1/jobs", endpoints.create_job, methods=["POST"]),
        Route("/api/v1/jobs/{job_id}", endpoints.get_job, methods=["GET"]),
        Route("/api/v1/dead-letters/{letter_id}/replay", endpoints.replay, methods=["POST"]),
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/metrics", endpoints.metrics_text, methods=["GET"]),
        Mount("/api/v1", app=LazyApp("service.read_api", "create", endpoints)),
        Mount("/ui", app=LazyApp("service.ui.app", "create", endpoints)),
    ]


def _error_handlers(metrics: ServiceMetrics) -> dict[type[Exception], Any]:
    def count(request: Request, outcome: str) -> None:
        source = HOOK_SOURCES.get(request.url.path)
        if source is not None:
            metrics.count(source, outcome)

    async def unverified(request: Request, exc: Exception) -> Response:
        count(request, "unauthorized")
        return JSONResponse({"error": str(exc)}, status_code=401)

    async def bad_event(request: Request, exc: Exception) -> Response:
        count(request, "bad_request")
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        count(request, "rejected")
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def queue_full(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QueueFull)
        headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse({"error": str(exc)}, status_code=429, headers=headers)

    async def unavailable(request: Request, exc: Exception) -> Response:
        count(request, "unavailable")
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": "state store unavailable, retry later"}, status_code=503)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # Nobody is left to answer (a body timeout or the sender hung up): no
        # traceback, and nothing was queued for a body that never arrived whole.
        count(request, "rejected")
        log.info(
            "%s %s: the client went away before its body arrived", request.method, request.url.path
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    return {
        Unverified: unverified,
        BadEvent: bad_event,
        HTTPException: http_error,
        QueueFull: queue_full,
        StateError: unavailable,
        ClientDisconnect: client_gone,
        Exception: internal,
    }


def _log_hooks(hooks: HookSettings) -> None:
    switches = (
        ("/hooks/registry", hooks.registry_token, "hooks.registry_token_env"),
        *(
            (f"/hooks/{source.name}", source.enabled(hooks) or None, source.setting)
            for source in sources.SOURCES
        ),
        ("/api/v1/jobs", hooks.api_token, "hooks.api_token_env"),
    )
    for path, secret, setting in switches:
        if secret is not None:
            log.info("%s enabled", path)
        elif setting in hooks.unset:
            # Configured, but the secret did not reach this process: every delivery will
            # get 404, and no sender reports that to anyone.
            log.warning(
                "%s disabled (answers 404 to every delivery): %s names %s, which is not set "
                "in this process's environment",
                path,
                setting,
                hooks.variable(setting),
            )
        else:
            log.warning("%s disabled (answers 404): %s is not set", path, setting)


def create_app(config: Config, *, sink: EventSink, state: State | None = None) -> Starlette:
    """The service; without ``state`` the lifespan connects to ``config.redis_url``."""
    if state is None and config.redis_url is None:
        raise ConfigError("the service needs redis.url (or REGSWEEP_REDIS_URL)")
    metrics = ServiceMetrics()
    endpoints = Endpoints(config, sink, metrics, state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        _log_hooks(config.hooks)
        owned = None
        if endpoints.state_store is None and config.redis_url is not None:
            owned = endpoints.state_store = State.from_url(config.redis_url)
        collector = _worker_metrics(metrics, config.redis_url)
        endpoints.scrapes = Scrapes(metrics, collector)
        registry = registry_client(config.registry)
        if endpoints.state_store is not None:
            endpoints.health = Health(endpoints.state_store, registry)
        reports = asyncio.create_task(_report_regularly(endpoints))
        try:
            yield
        finally:
            reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reports
            await endpoints.report(withdraw=True)
            endpoints.health = None
            await registry.aclose()
            if collector is not None:
                metrics.registry.unregister(collector)
                await collector.client.aclose()
            if owned is not None:
                endpoints.state_store = None
                await owned.aclose()
            if isinstance(sink, CelerySink):
                await sink.aclose()

    middleware = [
        Middleware(RequestLatency, metrics=metrics),
        Middleware(PolicyLook, endpoints=endpoints),
    ]
    if config.hooks.metrics_listen is not None:
        _, metrics_port = split_address(config.hooks.metrics_listen)
        middleware.append(Middleware(MetricsApart, port=metrics_port))
    app = Starlette(
        routes=_routes(endpoints),
        middleware=middleware,
        exception_handlers=_error_handlers(metrics),
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app


def _watch(config: Config) -> PolicyWatch | None:
    """A watch on the file ``config`` came from; None for a Config made in memory."""
    try:
        return PolicyWatch(config)
    except ConfigError:
        return None


async def _report_regularly(endpoints: Endpoints) -> None:
    """Look at the policy file and report it every :data:`REPORT_EVERY`, requests or not,
    and at once when a request found it changed."""
    while True:
        endpoints.look()
        endpoints.changed.clear()
        await endpoints.report()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(endpoints.changed.wait(), REPORT_EVERY.total_seconds())


class PolicyLook:
    """Takes a changed policy file between requests (:meth:`Endpoints.look`)."""

    def __init__(self, app: ASGIApp, endpoints: Endpoints) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.endpoints.look()
        await self.app(scope, receive, send)


def _worker_metrics(metrics: ServiceMetrics, url: str | None) -> WorkerMetricsSnapshot | None:
    """Expose the workers' counters (kept in Redis) on this service's /metrics."""
    if url is None:
        return None
    collector = WorkerMetricsSnapshot(async_client(url))
    metrics.registry.register(collector)
    return collector


GIL_SWITCH_INTERVAL: Final = 0.0005

#: uvicorn's own loggers go through the root logger's JSON handler.
UVICORN_LOG_CONFIG: Final[dict[str, Any]] = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"uvicorn": {"level": "INFO"}},
}

#: How ``regsweep serve`` runs uvicorn (``bench/ingest_bench.py`` runs its reference
#: endpoint with the same). httptools and uvloop by name, not uvicorn's "auto": both
#: are dependencies, and a missing one should fail the start, not silently halve
#: the throughput (h11 and asyncio's own loop cost ~120 µs more per request).
#: No access log: one line per request is the registry's load, and metrics count
#: requests instead. ``access_log=False``, not a quiet logger: uvicorn formats the
#: client address and path for every request whenever the access logger has a
#: handler anywhere up the tree, whatever its level.
UVICORN_OPTIONS: Final[dict[str, Any]] = {
    "http": "httptools",
    "loop": "uvloop",
    "proxy_headers": False,
    "log_config": UVICORN_LOG_CONFIG,
    "access_log": False,
}


def serve(config: Config, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service under uvicorn until interrupted, enqueueing Celery tasks."""
    if config.redis_url is None:
        raise ConfigError("regsweep serve needs redis.url (or REGSWEEP_REDIS_URL)")
    logs.configure()
    # Publishes to a broker that is not plain Redis go through Celery in a
    # thread (the rest are LPUSHed from the loop); with CPython's
    # default 5 ms switch interval that thread waits for the GIL behind the event
    # loop on every socket call (a convoy), which alone once capped the registry
    # hook at about a third of its throughput. 0.5 ms keeps the hand-offs short.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    sink = CelerySink.from_config(config)
    app = create_app(config, sink=sink)
    # What exists now (modules, the Celery app, the config) lives as long as the
    # process: take it out of the cyclic GC, whose full collections would walk it
    # all every few thousand deliveries and stall every request in flight for
    # ~20 ms (the hook's p99 at saturation, docs/performance.md).
    gc.freeze()
    server = uvicorn_server(app, config.hooks, host, port)
    try:
        server.run(sockets=listening_sockets(server.config, config.hooks))
    finally:
        sink.close()


def uvicorn_server(app: ASGIApp, hooks: HookSettings, host: str, port: int) -> uvicorn.Server:
    """uvicorn on httptools and uvloop, each connection bounded by ``hooks``' limits."""
    options = UVICORN_OPTIONS | {"http": bounded_protocol(RequestLimits.of(hooks))}
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))


def listening_sockets(config: uvicorn.Config, hooks: HookSettings) -> list[socket.socket]:
    """The hooks' socket, and /metrics' own when ``hooks.metrics_listen`` is set."""
    sockets = [config.bind_socket()]
    if hooks.metrics_listen is not None:
        host, port = split_address(hooks.metrics_listen)
        if port == config.port:
            raise ConfigError("hooks.metrics_listen must not use the port the service serves on")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sockets.append(socket.create_server((host, port), family=family))
    return sockets


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (validated by the config) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsApart:
    """With ``hooks.metrics_listen``, ``/metrics`` answers on that port only, and nothing
    else does: the scrape address can be one the hooks' clients never reach."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.app = app
        self.port = port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            on_metrics_port = server is not None and server[1] == self.port
            if on_metrics_port != (scope["path"] == "/metrics"):
                await JSONResponse({"error": "Not Found"}, status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)
