"""The read API under /api/v1 on a real uvicorn and Redis: every route, its token rules, its
filters and bad input, and the OpenAPI document that describes them all.

Repositories are planned for real (the planner on a made-up snapshot) and kept as a worker
keeps them (tests/harness/dashboard.py); audit records, holds, jobs and dead letters are
written through the stores the workers use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from starlette.routing import Route

from service.app import create_app
from service.read_api import OPENAPI, ReadApi
from tests.harness import service as h
from tests.harness.dashboard import POLICY, fake_digest, seed_repository
from tests.harness.sinks import RedisListSink
from worker.records import Hold
from worker.settings.model import (
    Config,
    HookSettings,
    MaintenanceSettings,
    RegistrySettings,
    Secret,
)
from worker.store.audit import AuditEntry, Outcome, RedisAuditLog, Settlement
from worker.store.keys import Keys
from worker.store.state import State
from worker.store.tagindex import TagIndex
from worker.store.views import record_gc

ADMIN = "admin-token-Rk2"
VIEWER = "viewer-token-Jw5"
AS_VIEWER = {"Authorization": f"Bearer {VIEWER}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
ROUTES = (
    "/api/v1/repositories",
    "/api/v1/repositories/team/web/plan",
    "/api/v1/jobs",
    "/api/v1/audit",
    "/api/v1/holds",
    "/api/v1/dead-letters",
    "/api/v1/status",
)


@dataclass
class Api:
    http: httpx.Client
    prefix: str
    sync: redis.Redis
    job_id: str
    entries: list[AuditEntry]

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers=AS_VIEWER)


def entry(
    repository: str, digest: str, tags: tuple[str, ...], job_id: str, at: datetime
) -> AuditEntry:
    return AuditEntry(
        time=at,
        repository=repository,
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=500,
        tags=tags,
        action="manifest",
        policy="seeded",
        rule="retention",
        reason="<b>old</b>",
        job_id=job_id,
        manifest=b"{}",
    )


async def _seed(prefix: str) -> tuple[str, list[AuditEntry]]:
    client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
    keys = Keys(prefix)
    state = State(client, prefix=prefix)
    await seed_repository(client, keys, "team/web", 60, index=True)
    await seed_repository(client, keys, "team/api", 5)
    await seed_repository(client, keys, "other/big", 120)
    index = TagIndex(client, prefix=prefix)
    # Learned after the plan: a push to a planned repository, and a repository no worker planned.
    await index.record_push("team/web", "fresh", fake_digest("fresh"), datetime.now(UTC))
    await index.record_push("unplanned/app", "v1", fake_digest("unplanned"), datetime.now(UTC))
    await index.record_delete("team/web", digest=None, tag="build-0003", at=datetime.now(UTC))
    await index.hold("team/web", Hold("build-0001", datetime.now(UTC) + timedelta(days=3), "test"))
    job_id = await state.create_job("prune", {"repository": "team/web", "dry_run": False})
    await state.update_job(job_id, state="succeeded", counts={"deleted": 2})
    audit = RedisAuditLog(client, keys=keys)
    base = datetime.now(UTC) - timedelta(hours=2)
    entries = [
        entry(
            "team/web", fake_digest(f"gone {i}"), (f"old-{i}",), job_id, base + timedelta(minutes=i)
        )
        for i in range(7)
    ]
    await audit.intend(entries)
    await audit.settle([Settlement.of(e, Outcome.DELETED) for e in entries])
    await state.dead_letter("registry", "unusable <script>alert(1)</script>", "{}")
    await client.aclose()
    return job_id, entries


def _config(hooks: HookSettings) -> Config:
    return Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=hooks,
        policies=(POLICY,),
        maintenance=MaintenanceSettings(window_cron="0 3 * * sun"),
    )


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    prefix = h.unique_prefix()
    job_id, entries = asyncio.run(_seed(prefix))
    sync = redis.Redis.from_url(h.REDIS_TEST_URL)
    record_gc(
        sync,
        Keys(prefix),
        "f" * 32,
        {
            "finished": "2026-01-11T03:20:00+00:00",
            "gc_ok": True,
            "bytes_reclaimed": 1234,
            "dry_run": False,
        },
    )
    hooks = HookSettings(api_token=Secret(ADMIN), viewer_token=Secret(VIEWER))
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    with (
        h.running(create_app(_config(hooks), sink=sink, state=state)) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        yield Api(http, prefix, sync, job_id, entries)
    h.delete_prefix(sync, prefix)
    sync.close()


def test_every_route_answers_either_token_and_refuses_others(api: Api) -> None:
    """Each read route answers 200 to the viewer token and to the API token, 401 with a JSON
    reason to no token and to a wrong one."""
    for path in ROUTES:
        assert api.http.get(path, headers=AS_VIEWER).status_code == 200, path
        assert api.http.get(path, headers=AS_ADMIN).status_code == 200, path
        missing = api.http.get(path)
        wrong = api.http.get(path, headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401, path
        assert "error" in wrong.json()


def test_reading_is_off_without_tokens() -> None:
    """With neither a viewer nor an API token configured, every read route answers 404 (as an
    unconfigured hook does), whatever token is sent."""
    prefix = h.unique_prefix()
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    app = create_app(_config(HookSettings()), sink=sink, state=state)
    with h.running(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        for path in ROUTES:
            assert http.get(path, headers=AS_VIEWER).status_code == 404, path


def test_repositories_are_searched_sorted_and_paged_on_the_server(api: Api) -> None:
    """``search`` keeps names containing it, ``sort`` orders (``-`` descending, unknown last),
    pages cut; a repository only the tag index knows is listed with its tag count."""
    names = [r["name"] for r in api.get("/api/v1/repositories").json()["repositories"]]
    assert names == ["other/big", "team/api", "team/web", "unplanned/app"]
    found = api.get("/api/v1/repositories", search="TEAM").json()
    assert [r["name"] for r in found["repositories"]] == ["team/api", "team/web"]
    by_tags = api.get("/api/v1/repositories", sort="-tags").json()["repositories"]
    assert [r["name"] for r in by_tags][:3] == ["other/big", "team/web", "team/api"]
    page = api.get("/api/v1/repositories", per_page=3, page=2).json()
    assert (page["total"], page["pages"], len(page["repositories"])) == (4, 2, 1)
    unplanned = page["repositories"][0]
    assert unplanned["name"] == "unplanned/app" and unplanned["tags"] == 1
    assert unplanned["planned_at"] is None
    web = next(r for r in by_tags if r["name"] == "team/web")
    assert web["policy"] == "seeded" and web["bytes"] > 30_000_000 and web["manifests"] > 0


def test_repositories_refuse_bad_parameters(api: Api) -> None:
    """A sort that is no column, a page that is no number: 400 naming the parameter."""
    assert "sort" in api.get("/api/v1/repositories", sort="evil").json()["error"]
    assert "page" in api.get("/api/v1/repositories", page="x").json()["error"]
    assert "per_page" in api.get("/api/v1/repositories", per_page=0).json()["error"]


def test_a_plan_shows_each_tag_and_what_happened_since(api: Api) -> None:
    """Each row has digest, push time and source, size, verdict and reason, held, protected;
    a tag pushed after the plan is ``unplanned``, one deleted since is ``gone``, holds are
    today's; signatures name their subject, manifests their referrers."""
    plan = api.get("/api/v1/repositories/team/web/plan").json()
    rows = {row["tag"]: row for row in plan["tags"]}
    assert rows["fresh"]["verdict"] == "unplanned"
    assert rows["build-0003"]["verdict"] == "gone"
    assert rows["build-0001"]["held"] is True and rows["latest"]["protected"] is True
    old, new = rows["build-0000"], rows["build-0059"]
    assert (
        old["verdict"] == "delete" and old["rule"] == "retention" and "newest 10" in old["reason"]
    )
    assert new["verdict"] == "keep" and new["pushed"]["source"] == "notification"
    assert new["size"] > 30_000_000
    signature = next(r for r in plan["tags"] if r["tag"].endswith(".sig"))
    assert plan["manifests"][signature["subject"]]["referrers"] == [signature["digest"]]
    assert plan["summary"]["tags"] == 60 + 1 + 3  # builds, latest, three signatures


def test_a_plan_of_an_unknown_or_invalid_repository(api: Api) -> None:
    """Nothing known of the name: 404; not a repository name: 400."""
    assert api.get("/api/v1/repositories/no/such/plan").status_code == 404
    assert api.get("/api/v1/repositories/UPPER/plan").status_code == 400


def test_jobs_list_with_what_each_deleted(api: Api) -> None:
    """Jobs come newest first with their first deletions from the audit; ``kind`` filters."""
    jobs = api.get("/api/v1/jobs").json()["jobs"]
    job = next(j for j in jobs if j["id"] == api.job_id)
    assert job["counts"] == {"deleted": 2} and len(job["deletions"]) == 5
    assert job["deletions"][0]["tags"] == ["old-0"]
    assert api.get("/api/v1/jobs", kind="gc").json()["jobs"] == []
    assert "limit" in api.get("/api/v1/jobs", limit=5000).json()["error"]


def test_audit_filters_and_pages_as_the_cli_does(api: Api) -> None:
    """Newest first; a page's ``next`` cursor continues where it stopped; repository, job,
    digest and since filter; a bad filter is a 400 naming it."""
    first = api.get("/api/v1/audit", limit=3).json()
    assert [e["tags"] for e in first["entries"]] == [["old-6"], ["old-5"], ["old-4"]]
    assert all(e["outcome"] == "deleted" and "manifest" not in e for e in first["entries"])
    rest = api.get("/api/v1/audit", limit=10, before=first["next"]).json()
    assert [e["tags"][0] for e in rest["entries"]] == ["old-3", "old-2", "old-1", "old-0"]
    assert rest["next"] is None
    by_job = api.get("/api/v1/audit", job=api.job_id).json()["entries"]
    assert len(by_job) == 7
    digest = api.entries[2].digest
    by_digest = api.get("/api/v1/audit", repository="team/web", digest=digest[:20]).json()
    assert [e["digest"] for e in by_digest["entries"]] == [digest]
    assert api.get("/api/v1/audit", since="1m").json()["entries"] == []
    assert api.get("/api/v1/audit", repository="team/api").json()["entries"] == []
    for bad in ({"since": "soon"}, {"job": "xyz"}, {"digest": "md5:1"}, {"before": "x"}):
        answer = api.get("/api/v1/audit", **bad)
        assert answer.status_code == 400 and next(iter(bad)) in answer.json()["error"]


def test_holds_dead_letters_and_status(api: Api) -> None:
    """Holds in force; dead letters with counts; status with the window, the GC history."""
    holds = api.get("/api/v1/holds").json()["holds"]
    assert [(h["repository"], h["tag"]) for h in holds] == [("team/web", "build-0001")]
    letters = api.get("/api/v1/dead-letters").json()
    assert letters["kept"] == 1 and "alert(1)" in letters["entries"][0]["reason"]
    status = api.get("/api/v1/status").json()
    assert status["maintenance"]["window"]["cron"] == "0 3 * * sun"
    assert status["gc_history"][0]["bytes_reclaimed"] == 1234
    assert status["dead_letters"] == {"kept": 1, "total": 1}


def test_the_openapi_document_describes_every_route(api: Api) -> None:
    """/api/v1/openapi.json (no token needed) names every route under /api/v1 with its methods:
    the read API's and those the service itself routes (jobs, replay), taken from the apps."""
    document = api.http.get("/api/v1/openapi.json").json()
    assert document == OPENAPI
    read = ReadApi(lambda: None).router().routes  # type: ignore[arg-type,return-value]
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=api.prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=api.prefix)
    service = create_app(_config(HookSettings()), sink=sink, state=state).routes
    routed: dict[str, set[str]] = {}
    for prefix, routes in (("/api/v1", read), ("", service)):
        for route in routes:
            if not isinstance(route, Route) or not (prefix + route.path).startswith("/api/v1/"):
                continue
            path = prefix + route.path.replace("{name:path}", "{name}")
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            routed.setdefault(path, set()).update(methods)
    assert "/api/v1/dead-letters/{letter_id}/replay" in routed
    assert {path: set(doc) for path, doc in document["paths"].items()} == routed


def test_a_listing_shows_what_changed_since_the_last_one(api: Api) -> None:
    """The parsed summaries are reused only while nothing changed: a repository planned, or
    one the tag index learned of, after a listing is in the next listing."""
    before = {r["name"] for r in api.get("/api/v1/repositories").json()["repositories"]}

    async def change() -> None:
        client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
        await seed_repository(client, Keys(api.prefix), "zz/planned", 2)
        index = TagIndex(client, prefix=api.prefix)
        await index.record_push("zz/pushed", "v1", fake_digest("zz"), datetime.now(UTC))
        await client.aclose()

    asyncio.run(change())
    after = api.get("/api/v1/repositories", sort="-tags").json()["repositories"]
    assert {r["name"] for r in after} - before == {"zz/planned", "zz/pushed"}
    planned = next(r for r in after if r["name"] == "zz/planned")
    assert planned["tags"] == 4 and planned["planned_at"] is not None  # 2 builds, latest, a sig
