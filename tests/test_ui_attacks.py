"""The dashboard and the read API attacked over HTTP, on a real uvicorn and Redis: hostile
numbers and cursors, forms missing their fields, guessing tokens in a burst or through the
read API, a revoked token, a session kept alive past its age, a confirmation run twice,
live job pages opened until no connection is left.

Each test is one weakness found in an audit of issue 21 (tests/test_dashboard.py has what
held from the start; tests/test_ui_browser.py the browser's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from service.access import SIGNIN_ATTEMPTS
from service.app import create_app
from service.ui.app import MAX_EVENT_STREAMS
from service.ui.session import _SALT, session_key
from tests.harness import service as h
from tests.harness.dashboard import POLICY, seed_repository
from tests.harness.sinks import RedisListSink
from tests.harness.stack import wait_for
from tests.test_dashboard import ADMIN, VIEWER, Ui, csrf_of, sign_in
from worker.settings.load import load_config
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.keys import Keys
from worker.store.state import State

AS_VIEWER = {"Authorization": f"Bearer {VIEWER}"}


@pytest.fixture(scope="module")
def ui() -> Iterator[Ui]:
    """A service with both tokens over a seeded repository, team/web (30 tags)."""
    prefix = h.unique_prefix()

    async def seed() -> None:
        client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
        await seed_repository(client, Keys(prefix), "team/web", 30, index=True)
        await client.aclose()

    asyncio.run(seed())
    hooks = HookSettings(api_token=Secret(ADMIN), viewer_token=Secret(VIEWER))
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"), hooks=hooks, policies=(POLICY,)
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    sync = redis.Redis.from_url(h.REDIS_TEST_URL)
    with h.running(create_app(config, sink=sink, state=state)) as url:
        yield Ui(url, prefix, sync)
    h.delete_prefix(sync, prefix)
    sync.close()


#: Numbers ``str.isdigit`` takes and ``int`` refuses: a superscript, 5,000 digits.
HOSTILE_NUMBERS = ("\u00b2", "9" * 5000)


def test_hostile_numbers_are_a_400_or_the_first_page_never_a_500(ui: Ui) -> None:
    """A limit, page or per_page of ``²`` or of 5,000 digits is a 400 naming it (the read
    API, the audit page, a hold's days) or reads as the first page (a page's paging), never
    an internal error."""
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        for number in HOSTILE_NUMBERS:
            for path, key in (
                ("/api/v1/jobs", "limit"),
                ("/api/v1/audit", "limit"),
                ("/api/v1/dead-letters", "limit"),
                ("/api/v1/repositories", "page"),
                ("/api/v1/repositories", "per_page"),
            ):
                answer = http.get(path, params={key: number}, headers=AS_VIEWER)
                assert answer.status_code == 400 and key in answer.json()["error"], (path, key)
            assert http.get("/ui/audit", params={"limit": number}).status_code == 400
            for path, row in (
                ("/ui/repositories", "/ui/r/team/web"),
                ("/ui/r/team/web", "build-0029"),
            ):
                for key in ("page", "per_page"):
                    page = http.get(path, params={key: number})
                    assert page.status_code == 200 and row in page.text, (path, key)
            form = {"csrf": csrf, "repository": "team/web", "tag": "build-0001", "days": number}
            held = http.post("/ui/actions/hold", data=form)
            assert held.status_code == 400 and "days" in held.text
        assert ui.sync.hgetall(f"{ui.prefix}hold:team/web") == {}


def test_audit_cursors_and_times_redis_would_refuse_are_a_400_not_an_outage(ui: Ui) -> None:
    """A ``before`` that is no stream id (a superscript, a part past 2**64, any text on the
    audit page) is a 400, not the 503 "Redis does not answer"; a ``since`` before 1970 (a
    year-1 time, a century back) lists everything."""
    with ui.client() as http:
        sign_in(http, VIEWER)
        for before in ("\u00b2-1", "1-\u00b2", f"{2**64}-0", "1-" + "9" * 30, "+", "x"):
            api = http.get("/api/v1/audit", params={"before": before}, headers=AS_VIEWER)
            assert api.status_code == 400 and "before" in api.json()["error"], before
            page = http.get("/ui/audit", params={"before": before})
            assert page.status_code == 400 and "before" in page.text, before
        for since in ("0001-01-01", "0001-01-01T00:00:00+14:00", "36000d"):
            api = http.get("/api/v1/audit", params={"since": since}, headers=AS_VIEWER)
            assert api.status_code == 200 and api.json()["entries"] == [], since
            assert http.get("/ui/audit", params={"since": since}).status_code == 200, since


def test_an_action_missing_a_field_is_a_400_naming_it(ui: Ui) -> None:
    """The admin's action posted without the repository, tag or digest it needs is a 400
    that names the field, and nothing is enqueued or held (it was an internal error)."""
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        before = len(ui.enqueued())
        for path, form, missing in (
            ("/ui/actions/preview", {"action": "delete-tag", "repository": "team/web"}, "tag"),
            ("/ui/actions/preview", {"action": "delete-tag", "tag": "build-0001"}, "repository"),
            (
                "/ui/actions/preview",
                {"action": "delete-digest", "repository": "team/web"},
                "digest",
            ),
            ("/ui/actions/preview", {"action": "prune"}, "repository"),
            ("/ui/actions/hold", {"repository": "team/web"}, "tag"),
            ("/ui/actions/hold", {"tag": "build-0001"}, "repository"),
            ("/ui/actions/unhold", {"repository": "team/web"}, "tag"),
            ("/ui/actions/restore", {"digest": "sha256:" + "a" * 64}, "repository"),
            ("/ui/actions/restore", {"repository": "team/web"}, "digest"),
        ):
            answer = http.post(path, data=form | {"csrf": csrf})
            assert answer.status_code == 400, (path, form)
            assert re.search(rf"has no {missing}\b", answer.text), (path, form)
        assert len(ui.enqueued()) == before
        assert ui.sync.hgetall(f"{ui.prefix}hold:team/web") == {}


def _policy(hooks: dict[str, str]) -> str:
    return yaml.safe_dump(
        {
            "registry": {"url": "http://127.0.0.1:1"},
            "redis": {"url": h.REDIS_TEST_URL},
            "hooks": hooks,
            "policies": [{"name": "team", "repositories": ["team/**"], "keep": [{"tags": ["*"]}]}],
        }
    )


def test_a_token_revoked_in_the_policy_file_stops_reading_and_its_sessions_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The viewer token removed from the running service's policy file: a fresh sign-in with
    it is refused, and so are the read API with it and the sessions signed in before (the
    viewer's and, the signing key being the tokens', the admin's) — not only at a restart."""
    monkeypatch.setenv("REGSWEEP_API_TOKEN", ADMIN)
    monkeypatch.setenv("REGSWEEP_VIEWER_TOKEN", VIEWER)
    monkeypatch.delenv("REGSWEEP_REDIS_URL", raising=False)
    both = {"api_token_env": "REGSWEEP_API_TOKEN", "viewer_token_env": "REGSWEEP_VIEWER_TOKEN"}
    path = tmp_path / "regsweep.yaml"
    path.write_text(_policy(both))
    os.utime(path, (0, 0))  # long written: a change is taken at once
    prefix = h.unique_prefix()
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    app = create_app(load_config(path), sink=sink, state=state)
    with (
        h.running(app) as url,
        httpx.Client(base_url=url, timeout=10) as viewer,
        httpx.Client(base_url=url, timeout=10) as admin,
        httpx.Client(base_url=url, timeout=10) as fresh,
    ):
        sign_in(viewer, VIEWER)
        sign_in(admin, ADMIN)
        assert viewer.get("/ui/").status_code == admin.get("/ui/").status_code == 200
        assert viewer.get("/api/v1/status", headers=AS_VIEWER).status_code == 200
        path.write_text(_policy({"api_token_env": "REGSWEEP_API_TOKEN"}))
        os.utime(path, (0, 0))
        wait_for(lambda: sign_in(fresh, VIEWER).status_code != 303, 10, what="the edit taken")
        assert viewer.get("/api/v1/status", headers=AS_VIEWER).status_code == 401
        for session in (viewer, admin):
            answer = session.get("/ui/")
            assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/signin")
    h.delete_prefix(redis.Redis.from_url(h.REDIS_TEST_URL), prefix)


@pytest.fixture
def guesses(ui: Ui) -> Iterator[str]:
    """The count of wrong tokens from this test's address, emptied before and after."""
    key = f"{ui.prefix}ui:signin:127.0.0.1"
    ui.sync.delete(key)
    yield key
    ui.sync.delete(key)


def test_a_burst_of_wrong_sign_ins_is_told_wrong_at_most_the_limit(ui: Ui, guesses: str) -> None:
    """A hundred wrong sign-ins sent at once: at most SIGNIN_ATTEMPTS are answered 401 (each
    is counted before it is answered), the rest 429, and the right token then 429 too."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=ui.url, timeout=30, limits=httpx.Limits(max_connections=100)
        ) as http:
            csrf = csrf_of(await http.get("/ui/signin"))
            answers = await asyncio.gather(
                *(
                    http.post("/ui/signin", data={"csrf": csrf, "token": f"guess-{i}"})
                    for i in range(100)
                )
            )
            right = await http.post("/ui/signin", data={"csrf": csrf, "token": ADMIN})
            return [a.status_code for a in answers] + [right.status_code]

    codes = asyncio.run(burst())
    assert codes.count(401) <= SIGNIN_ATTEMPTS and codes.count(429) == 101 - codes.count(401)
    assert codes[-1] == 429


def test_the_read_and_job_apis_count_wrong_tokens_with_the_sign_in(ui: Ui, guesses: str) -> None:
    """Wrong bearer tokens on the read API and the job API count with failed sign-ins from
    the same address: past SIGNIN_ATTEMPTS each route answers 429 with Retry-After, for the
    right viewer and API token as well, and the sign-in form refuses the right token too; a
    request without any token is no guess."""
    wrong = {"Authorization": "Bearer guess"}
    queued = len(ui.enqueued())
    with ui.client() as http:
        for _ in range(3):
            assert http.get("/api/v1/status").status_code == 401  # no token: not counted
        for i in range(SIGNIN_ATTEMPTS):
            path = "/api/v1/status" if i % 2 else f"/api/v1/jobs/{'0' * 32}"
            assert http.get(path, headers=wrong).status_code == 401, i
        for path, token in (
            ("/api/v1/status", "guess"),
            ("/api/v1/status", VIEWER),
            ("/api/v1/repositories", ADMIN),
            (f"/api/v1/jobs/{'0' * 32}", ADMIN),
        ):
            answer = http.get(path, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0, path
            assert "too many wrong tokens" in answer.json()["error"]
        job = http.post(
            "/api/v1/jobs", json={"kind": "gc"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert job.status_code == 429
        assert sign_in(http, VIEWER).status_code == 429
    assert len(ui.enqueued()) == queued


def _cookie(role: str, ago: timedelta) -> str:
    """A session cookie the service itself would have issued ``ago``."""

    class Then(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - ago.total_seconds())

    hooks = HookSettings(api_token=Secret(ADMIN), viewer_token=Secret(VIEWER))
    serializer = URLSafeTimedSerializer(session_key(hooks), salt=_SALT, signer=Then)
    return str(serializer.dumps({"r": role, "c": "csrf-token-of-the-session"}))


def test_a_session_ends_twelve_hours_after_sign_in_however_busy(ui: Ui) -> None:
    """Pages do not sign a session's cookie again: a session signed in 11 h 59 min ago is
    served without a fresher cookie (so it ends at 12 h, not 12 h after its last page),
    and one signed in 12 h 1 min ago is signed out."""
    for path in ("/ui/", "/ui/jobs", "/ui/signin"):
        with ui.client() as http:
            cookie = _cookie("admin", timedelta(hours=11, minutes=59))
            http.cookies.set("regsweep_session", cookie, path="/ui")
            answer = http.get(path)
            assert answer.status_code == 200 and "set-cookie" not in answer.headers, path
            assert http.cookies["regsweep_session"] == cookie
    with ui.client() as http:
        http.cookies.set(
            "regsweep_session", _cookie("admin", timedelta(hours=12, minutes=1)), path="/ui"
        )
        answer = http.get("/ui/")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/signin")


def test_a_preview_runs_once_however_often_its_run_is_posted(ui: Ui) -> None:
    """The run of a succeeded preview posted three times (a double click, a resent form)
    makes one job: every answer leads to it and one run is enqueued, so a tag re-pushed
    after the run is never deleted again by the old confirmation."""
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        form = {"csrf": csrf, "action": "delete-tag", "repository": "team/web", "tag": "build-0003"}
        preview_id = http.post("/ui/actions/preview", data=form).headers["location"].rsplit("/")[-1]
        plan = {"fingerprint": "e" * 64, "deletions": 1, "listed": []}
        ui.sync.hset(
            f"{ui.prefix}job:{preview_id}",
            mapping={"state": '"succeeded"', "plan": json.dumps(plan)},
        )
        before = len(ui.enqueued())
        answers = [
            http.post("/ui/actions/run", data={"csrf": csrf, "preview": preview_id})
            for _ in range(3)
        ]
        assert {a.status_code for a in answers} == {303}
        assert len({a.headers["location"] for a in answers}) == 1
        runs = ui.enqueued()[before:]
        assert len(runs) == 1 and runs[0]["params"]["preview"] == preview_id
        assert answers[0].headers["location"] == f"/ui/jobs/{runs[0]['job_id']}"


def test_live_job_pages_cannot_take_every_connection(ui: Ui) -> None:
    """A viewer's script opening event streams of a running job gets MAX_EVENT_STREAMS of
    them, then 503 with Retry-After (each holds its connection while the job runs, and the
    registry's hooks share the connections); a stream closed gives its place back."""
    job_id = _running_job(ui)
    path = f"/ui/jobs/{job_id}/events"

    async def flood() -> None:
        async with httpx.AsyncClient(
            base_url=ui.url, timeout=30, limits=httpx.Limits(max_connections=MAX_EVENT_STREAMS + 2)
        ) as http:
            csrf = csrf_of(await http.get("/ui/signin"))
            await http.post("/ui/signin", data={"csrf": csrf, "token": VIEWER})
            async with contextlib.AsyncExitStack() as streams:
                lines = []  # kept: a line iterator let go closes its stream
                for _ in range(MAX_EVENT_STREAMS):
                    stream = await streams.enter_async_context(http.stream("GET", path))
                    assert stream.status_code == 200
                    lines.append(stream.aiter_lines())
                    assert (await anext(lines[-1])) == "event: job"
                refused = await http.get(path, timeout=10)
                assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
            await _eventually_streams(http, path)

    asyncio.run(flood())


async def _eventually_streams(http: httpx.AsyncClient, path: str) -> None:
    for _ in range(200):
        async with http.stream("GET", path) as stream:
            if stream.status_code == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("no stream's place came back once the streams closed")


def _running_job(ui: Ui) -> str:
    async def create() -> str:
        state = State.from_url(h.REDIS_TEST_URL, prefix=ui.prefix)
        job_id = await state.create_job("prune", {"repository": "team/web", "dry_run": False})
        await state.start_job(job_id)
        await state.aclose()
        return job_id

    return asyncio.run(create())
